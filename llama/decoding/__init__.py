"""What happens between the model's steps and the caller: the decode loop and its ending rules
(loop.py), and per-token text events for streaming (stream.py)."""
