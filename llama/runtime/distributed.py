"""Process group, model-parallel group and device for this process.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one. CUDA gets nccl,
everything else gloo, so the same fairscale layers run on a laptop CPU and on a GPU cluster.

A rank that stops answering (frozen, stuck on I/O) ends the job instead of hanging it: each
collective of a generation step waits at most LLAMA_DIST_TIMEOUT seconds (default 300; torch's
own default is 30 minutes). Loading a shard of a large model can take minutes more on one rank
than on another, so the ranks meet once after loading with their own limit, LLAMA_LOAD_TIMEOUT
(default 3600), and llama-chat's ranks wait for the user's next line without a limit.
"""

import atexit
import contextlib
import functools
import io
import logging
import os
import re
from datetime import timedelta
from typing import Dict, Iterator, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT = "LLAMA_DIST_TIMEOUT", 300.0
LOAD_TIMEOUT_ENV, DEFAULT_LOAD_TIMEOUT = "LLAMA_LOAD_TIMEOUT", 3600.0
_NO_LIMIT = timedelta(days=365)
# Gloo groups beside the default one, for the waits that must not use the step timeout.
_groups: Dict[str, "dist.ProcessGroup"] = {}


class PeerTimeout(RuntimeError):
    """Another rank did not reach a collective within the time allowed."""


def timeout_seconds(env: str, default: float) -> float:
    """A positive number of seconds from the environment variable `env`, else `default`."""
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{env} must be a positive number of seconds, got {value!r}")
    return seconds


def model_parallel_size_to_use(model_parallel_size: Optional[int]) -> int:
    """Model-parallel size asked for, else the torchrun world size (1 without torchrun).

    Raises TypeError / ValueError for a model_parallel_size that is not a positive integer.
    """
    if model_parallel_size is None:
        return int(os.environ.get("WORLD_SIZE", 1))
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int):
        raise TypeError(f"model_parallel_size must be an integer (a number of processes), got {model_parallel_size!r}")
    if model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be >= 1, got {model_parallel_size}")
    return model_parallel_size


def check_world_holds(model_parallel_size: int) -> None:
    """The running processes can form groups of model_parallel_size: Llama.build cannot start processes itself.

    Without this, a single process asked for 2 would build a whole model and load half of each
    weight into it, failing on shapes. Raises ValueError saying how to start the processes.
    """
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    if world % model_parallel_size == 0:
        return
    if world == 1:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs {model_parallel_size} processes, but this is a single process: "
            f"run with `torchrun --nproc_per_node {model_parallel_size} ...` (or leave model_parallel_size out)"
        )
    raise ValueError(
        f"model_parallel_size={model_parallel_size} does not divide the {world} processes started: "
        f"run with `torchrun --nproc_per_node {model_parallel_size} ...` (or leave model_parallel_size out)"
    )


def select_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """The given device, else this process's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for, but CUDA is not available here; pass device='cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device={str(device)!r} was asked for, but MPS is not available here; pass device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def dtype_named(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A dtype given by name ("bf16", "float32"...) or as itself; ValueError names the known names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of dtype."""
    return torch.empty((), dtype=dtype).element_size()


def select_dtype(device: torch.device, dtype: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """The given dtype, else bf16 on GPUs that support it (fp16 on older ones) and fp32 elsewhere."""
    if dtype is not None:
        return dtype_named(dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def init_model_parallel(model_parallel_size: int, device: torch.device) -> None:
    """Join the torchrun process group (or make a world of one) and fairscale's model-parallel group."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            step = timeout_seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT)
            load = timeout_seconds(LOAD_TIMEOUT_ENV, DEFAULT_LOAD_TIMEOUT)
            dist.init_process_group(backend, timeout=timedelta(seconds=step))
            if dist.get_world_size() > 1:
                _groups["load"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=load))
                _groups["input"] = dist.new_group(backend="gloo", timeout=_NO_LIMIT)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Left to interpreter teardown, gloo's threads can abort the process after its work is done
        # ("terminate called without an active exception"): end the group while Python still runs.
        atexit.register(_destroy_process_group)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not model_parallel_is_initialized():
        # fairscale prints its set-up on stdout; keep it in the log instead.
        with contextlib.redirect_stdout(io.StringIO()) as fairscale_says, _new_groups_wait_as_the_world():
            initialize_model_parallel(model_parallel_size)
        logger.debug(fairscale_says.getvalue().strip())


@contextlib.contextmanager
def _new_groups_wait_as_the_world() -> Iterator[None]:
    """Groups made meanwhile get the default group's timeout. fairscale makes its model-parallel
    group, which every step's collectives use, with torch's default (30 minutes for gloo) instead."""
    if dist.get_world_size() == 1:
        yield
        return
    new_group = dist.new_group
    dist.new_group = functools.partial(new_group, timeout=timedelta(seconds=timeout_seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT)))
    try:
        yield
    finally:
        dist.new_group = new_group


def input_group() -> Optional["dist.ProcessGroup"]:
    """The group for waiting on the user (llama-chat's next line): no time limit. None: the default group."""
    return _groups.get("input")


def wait_for_every_rank_to_load() -> None:
    """Meet the other ranks after loading, waiting up to LLAMA_LOAD_TIMEOUT; PeerTimeout names the late ranks."""
    group = _groups.get("load")
    if group is None:
        return
    seconds = timeout_seconds(LOAD_TIMEOUT_ENV, DEFAULT_LOAD_TIMEOUT)
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
    except RuntimeError as e:
        if peer_ended(e):
            raise
        # Rank 0 hears from every rank and names the late ones; the others only hear from rank 0.
        late = _LATE_RANKS.search(str(e))
        who = f"rank{'s' if ',' in late.group(1) else ''} {late.group(1)}" if late else "rank 0"
        raise PeerTimeout(
            f"{who} did not finish loading within {seconds:g} s; if loading is that slow, "
            f"set {LOAD_TIMEOUT_ENV} to more seconds, else see what {who} is doing"
        ) from e


_GLOO_TIMEOUT = re.compile(r"Timed out waiting (\d+)ms for (?:send|recv) operation")
_LATE_RANKS = re.compile(r"Ranks? ([\d, ]*\d) failed to pass monitoredBarrier")
_PEER_ENDED = re.compile(r"Connection (?:closed|reset) by peer")


def describe_collective_failure(e: BaseException) -> Optional[str]:
    """A message for a gloo collective that failed because another rank is gone or silent, else None."""
    if not isinstance(e, RuntimeError) or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    rank, others = dist.get_rank(), [r for r in range(dist.get_world_size()) if r != dist.get_rank()]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    timeout = _GLOO_TIMEOUT.search(str(e))
    if timeout:
        return (
            f"{who} did not answer within {int(timeout.group(1)) / 1000:g} s (rank {rank} waited for it): it is "
            f"stopped, stuck or far slower; {STEP_TIMEOUT_ENV} sets the limit in seconds"
        )
    if peer_ended(e):
        return f"{who} ended while rank {rank} was working with it: its own message, or torchrun's summary, says why"
    return None


def peer_ended(e: BaseException) -> bool:
    """Whether a collective failed because another rank's process is gone."""
    return isinstance(e, RuntimeError) and _PEER_ENDED.search(str(e)) is not None


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def default_device_and_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules whose own buffers (KV cache, norms) land on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)
