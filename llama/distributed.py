"""Process group, model-parallel group and device for this process.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one. CUDA gets nccl,
everything else gloo, so the same fairscale layers run on a laptop CPU and on a GPU cluster.
"""

import atexit
import contextlib
import io
import logging
import os
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel, model_parallel_is_initialized

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def requested_world_size(model_parallel_size: Optional[int]) -> int:
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


def select_dtype(device: torch.device, dtype: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """The given dtype, else bf16 on GPUs that support it (fp16 on older ones) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def init_model_parallel(model_parallel_size: int, device: torch.device) -> None:
    """Join the torchrun process group (or make a world of one) and fairscale's model-parallel group."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # Left to interpreter teardown, gloo's threads can abort the process after its work is done
        # ("terminate called without an active exception"): end the group while Python still runs.
        atexit.register(_destroy_process_group)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not model_parallel_is_initialized():
        # fairscale prints its set-up on stdout; keep it in the log instead.
        with contextlib.redirect_stdout(io.StringIO()) as fairscale_says:
            initialize_model_parallel(model_parallel_size)
        logger.debug(fairscale_says.getvalue().strip())


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
