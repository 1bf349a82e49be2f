"""How the command-line programs end on an error the user can fix: one line, `error: <message>`.

Every program (the example scripts, llama-chat, llama-convert, llama-reshard) runs its `main`
inside `reported_errors()`. The library's errors already say what is wrong and what to do, so
the traceback under them only hides the message; LLAMA_DEBUG=1 shows it again.

Expected errors are the types the library raises for bad input and broken files (ValueError,
CheckpointError, TypeError, OSError such as FileNotFoundError) and RuntimeError, which torch and
the library use for the machine itself: no CUDA, no C++ compiler, out of memory, a rank that
stopped answering. Anything else (KeyError, AttributeError...) is a bug and keeps its traceback.

Under torchrun every process reads the same arguments and files until the process group is
joined, so errors before that are printed by rank 0 alone (the other ranks wait for it to print
before they end: torchrun stops every rank as soon as one ends); afterwards a rank can fail on its own
(its shard, a peer that does not answer), and such errors are printed by the rank that saw them,
naming it; that another rank ended is said by rank 0 only. torchrun then prints its own summary
(ChildFailedError, with a traceback of torchrun itself) below the line.
"""

import contextlib
import os
import sys
import time
from typing import Iterator

from llama.args import CheckpointError
from llama.runtime.distributed import describe_collective_failure, peer_ended

DEBUG_ENV = "LLAMA_DEBUG"
EXPECTED = (ValueError, TypeError, OSError, RuntimeError)
# Errors that can differ between ranks once they work on their own shard and talk to each other.
RANK_OWN = (CheckpointError, OSError, RuntimeError)
INTERRUPTED = 130  # as shells report a program ended by Ctrl-C
# How long a rank other than 0 waits, on an error every rank meets, for rank 0 to print it; torchrun
# ends the waiting ranks as soon as rank 0 ends.
RANK0_GRACE_S = 30.0


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Run a program's body; an expected error becomes `error: <message>` on stderr and exit
    status 1, Ctrl-C exit status 130 without a word. With LLAMA_DEBUG=1 errors propagate."""
    try:
        yield
    except KeyboardInterrupt:
        if debugging():
            raise
        raise SystemExit(INTERRUPTED) from None
    except EXPECTED as e:
        if debugging():
            raise
        message = _describe(e)
        rank = int(os.environ.get("RANK", 0))
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        elif not _group_joined():
            time.sleep(RANK0_GRACE_S)
        elif isinstance(e, RANK_OWN) and not peer_ended(e):
            print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _describe(e: BaseException) -> str:
    return describe_collective_failure(e) or str(e) or type(e).__name__


def _group_joined() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
