"""Meta checkpoint folders: find and check the files, read params.json, load a shard into a model.

A folder holds params.json and consolidated.NN.pth shards, one per model-parallel process. Shards
are memory-mapped with weights_only=True: no pickle code runs, and tensors already in the compute
dtype on the CPU are used in place instead of being copied.
"""

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Real Llama 2 shards carry this precomputed RoPE table, which the model computes itself.
IGNORED_KEYS = frozenset({"rope.freqs"})


# Weights cut by model parallelism, and along which dimension: fairscale's ColumnParallelLinear
# splits its output features (dim 0), RowParallelLinear its input features (dim 1).
_SHARD_DIMS = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
}


def shard_dim(key: str, vocab_parallel_embedding: bool) -> Optional[int]:
    """Dimension along which Meta's consolidated.NN.pth shards split this weight; None if every shard has it whole.

    The embedding is split along the vocabulary (Llama 3) or the model dimension (Llama 2).
    """
    if key == "tok_embeddings.weight":
        return 0 if vocab_parallel_embedding else 1
    suffix = key.split(".", 2)[-1] if key.startswith("layers.") else key
    return _SHARD_DIMS.get(suffix)


_REDOWNLOAD = "The file is damaged or incomplete; check it (md5sum -c checklist.chk) and download it again."


class CheckpointError(ValueError):
    """A checkpoint folder or shard that cannot be used, with what to do about it."""


def checkpoint_paths(ckpt_dir: str) -> List[Path]:
    """The sorted *.pth shards of ckpt_dir, after checking that the folder and params.json exist."""
    folder = Path(ckpt_dir)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir!r}; pass --ckpt_dir with the folder download.sh made (e.g. llama-2-7b-chat/)")
    if not folder.is_dir():
        raise NotADirectoryError(f"--ckpt_dir must be a folder holding consolidated.*.pth and params.json, got the file {ckpt_dir!r}")
    shards = sorted(folder.glob("*.pth"))
    if not shards:
        raise CheckpointError(f"no checkpoint files (*.pth) found in {ckpt_dir!r}; is the download complete? (run download.sh again)")
    if not (folder / "params.json").is_file():
        raise CheckpointError(f"{ckpt_dir!r} has no params.json; it comes with the weights from download.sh")
    return shards


def read_params(ckpt_dir: str) -> Dict[str, Any]:
    path = Path(ckpt_dir) / "params.json"
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} should hold a JSON object of model parameters, got {type(params).__name__}")
    return params


def check_shard_count(shards: List[Path], model_parallel_size: int) -> None:
    if len(shards) != model_parallel_size:
        folder = shards[0].parent
        raise CheckpointError(
            f"{folder} holds {len(shards)} shard(s) but this run has model_parallel_size={model_parallel_size}: "
            f"one process per shard is needed; launch with `torchrun --nproc_per_node {len(shards)} ...`"
        )


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one shard's tensors; a damaged or unsafe file raises CheckpointError naming it."""
    # torch.save has written zip archives since torch 1.6, Meta's shards included: anything else is damaged.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint shard {path}: it is not a torch.save archive. {_REDOWNLOAD}")
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip().rstrip(".") for line in str(e).splitlines() if "nsupported" in line]
        reason = f": {found[0]}" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors, which could run code{reason}. "
            "Use the files from Meta's download."
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint shard {path}: {e}. {_REDOWNLOAD}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors; is it a Meta consolidated.NN.pth shard?")
    return state_dict


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Put the shard's tensors into model in place of its parameters, converted to (device, dtype).

    Parameters are swapped (assign=True), not copied into, so the weights exist once in memory.
    """
    expected = model.state_dict()
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        embedding = state_dict["tok_embeddings.weight"]
        if embedding.shape == expected["output.weight"].shape:
            # Llama 3.2 1B/3B tie the output projection to the embedding (same vocabulary split).
            state_dict = {**state_dict, "output.weight": embedding}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in IGNORED_KEYS]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}; "
            "params.json and the shards do not belong together, or the file is incomplete"
        )
    if unexpected:
        logger.warning("%s: ignoring %d unexpected tensor(s), e.g. %s", path, len(unexpected), unexpected[:3])
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{path} does not match params.json and the model-parallel size: " + "; ".join(mismatched[:3])
        )
    converted = {k: state_dict[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(converted, strict=True, assign=True)
