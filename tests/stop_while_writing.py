"""Run a llama command line that stops itself (SIGSTOP) with its first shard half written.

    python tests/stop_while_writing.py llama.cli.reshard --ckpt_dir A --output_dir B ...

The test that starts it sees it stop (os.waitpid with WUNTRACED), then kills it, or sends it
SIGTERM and SIGCONT: an interruption at a known point of the write, with no sleep.
"""

import os
import runpy
import signal
import sys

import torch

_save = torch.save


def save_half_then_stop(obj, f, *args, **kwargs) -> None:
    torch.save = _save  # once
    _save(obj, f, *args, **kwargs)
    os.truncate(f, os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGSTOP)


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    torch.save = save_half_then_stop
    runpy.run_module(module, run_name="__main__", alter_sys=True)
