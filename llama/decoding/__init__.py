"""What happens between the model's steps and the caller: per-token text events for streaming."""
