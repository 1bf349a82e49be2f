"""Meta checkpoint folders: find and check the files, read params.json and the shards, cut them.

A folder holds params.json and consolidated.NN.pth shards, one per model-parallel process. Shards
are memory-mapped with weights_only=True: no pickle code runs, and tensors already in the compute
dtype on the CPU are used in place instead of being copied.
"""

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from llama.args import CheckpointError, check_params

# What a Meta folder's tokenizer is called: Meta's own, or a converted byte-level BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

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


_LAYER_KEY = re.compile(r"layers\.(\d+)\.")

_REDOWNLOAD = "The file is damaged or incomplete; check it (md5sum -c checklist.chk) and download it again."


def unexpected_weights_error(
    source: str, keys: List[str], n_layers: int, layers_field: str, shown: Callable[[str], str] = str
) -> CheckpointError:
    """The error for weights (Meta keys) that a model built from the parameters does not have.

    Layers past layers_field are named as such: loading without them would run a truncated
    model. shown(key) is the source's own name for a key.
    """
    examples = [shown(k) for k in keys[:3]]
    layers = [int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))]
    if layers and max(layers) >= n_layers:
        return CheckpointError(
            f"{source}: {layers_field} = {n_layers}, but the weights have {max(layers) + 1} layers (e.g. {examples}): "
            f"the model would run without them and give wrong results; correct {layers_field}, or use the parameters "
            "that came with these weights"
        )
    return CheckpointError(
        f"{source} holds {len(keys)} weight(s) a Llama model does not have, e.g. {examples}; is it a Meta Llama checkpoint?"
    )


def vocab_parallel_layout(embedding_shape: Sequence[int], shards: int, params: Dict[str, Any], family_says: bool) -> bool:
    """Whether a Meta folder's tok_embeddings is split by vocabulary (Llama 3) or by model dimension
    (Llama 2's ParallelEmbedding), given its first shard's embedding shape. Several shards show it:
    each keeps the whole model dimension only when split by vocabulary. One shard cannot show it:
    family_says is what the tokenizer family's defaults say (llama.args.FAMILY_DEFAULTS)."""
    if shards > 1:
        return embedding_shape[1] == params.get("dim")
    return family_says


def checkpoint_paths(ckpt_dir: str) -> List[Path]:
    """The sorted *.pth shards of ckpt_dir, after checking that the folder and params.json exist."""
    folder = Path(ckpt_dir)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir!r}; pass --ckpt_dir with the folder download.sh made (e.g. llama-2-7b-chat/)")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"--ckpt_dir must be a folder holding consolidated.*.pth and params.json (or a Hugging Face folder, "
            f"or a .gguf file), got the file {ckpt_dir!r}"
        )
    shards = sorted(folder.glob("*.pth"))
    if not shards:
        raise CheckpointError(f"no checkpoint files (*.pth) found in {ckpt_dir!r}; is the download complete? (run download.sh again)")
    if not (folder / "params.json").is_file():
        raise CheckpointError(f"{ckpt_dir!r} has no params.json; it comes with the weights from download.sh")
    return shards


def read_params(ckpt_dir: str) -> Dict[str, Any]:
    """ckpt_dir's params.json, its values checked (llama.args.check_params) before anything is built from them."""
    path = Path(ckpt_dir) / "params.json"
    params = read_json_object(path)
    check_params(params, str(path))
    return params


def read_json_object(path: Path) -> Dict[str, Any]:
    """A JSON file holding an object (params.json, config.json); anything else raises CheckpointError."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object of model parameters, got {type(value).__name__}")
    return value


def valid_model_parallel_sizes(n_heads: int, n_kv_heads: int, split_size: int, limit: int = 64) -> List[int]:
    """Process counts (up to limit) that divide the heads, the key/value heads and the embedding's split side."""
    return [m for m in range(1, limit + 1) if n_heads % m == 0 and n_kv_heads % m == 0 and split_size % m == 0]


def check_model_parallel_size(
    n_heads: int,
    n_kv_heads: int,
    split_size: int,
    model_parallel_size: int,
    ckpt_dir: str,
    remedy: str = "torchrun --nproc_per_node {n} ...",
) -> None:
    """Any process count works if it keeps whole heads and equal embedding slices together; else say
    which do. `remedy` is how the caller's user asks for a count n (a torchrun line, a flag)."""
    valid = valid_model_parallel_sizes(n_heads, n_kv_heads, split_size)
    if model_parallel_size not in valid:
        raise CheckpointError(
            f"{ckpt_dir}: {n_heads} attention heads ({n_kv_heads} key/value heads, embedding side {split_size}) "
            f"cannot be split over {model_parallel_size} processes; valid numbers of processes: "
            f"{', '.join(map(str, valid))} (e.g. `{remedy.format(n=valid[-1])}`)"
        )


def resharded_state_dict(
    shards: List[Dict[str, torch.Tensor]], rank: int, model_parallel_size: int, vocab_parallel_embedding: bool
) -> Dict[str, torch.Tensor]:
    """This rank's slice of a checkpoint saved as len(shards) shards, for model_parallel_size processes.

    Meta's shards of a split weight are equal contiguous slices (whole head blocks for wq/wk/wv), so
    the full weight is their concatenation and the new slice is one of model_parallel_size equal
    chunks. Only the overlapping parts of the (memory-mapped) shards are read: narrow, then cat.
    Replicated weights come from shard 0.
    """
    n = len(shards)
    out = {}
    for key, first in shards[0].items():
        dim = shard_dim(key, vocab_parallel_embedding)
        if dim is None:
            out[key] = first
            continue
        part = first.shape[dim]
        full = part * n
        if full % model_parallel_size:
            raise CheckpointError(f"{key}: size {full} along dim {dim} cannot be split in {model_parallel_size} equal parts")
        size = full // model_parallel_size
        start, end = rank * size, (rank + 1) * size
        pieces = []
        for i, shard in enumerate(shards):
            lo, hi = i * part, (i + 1) * part
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces.append(shard[key].narrow(dim, a - lo, b - a))
        out[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
    return out


def load_for_rank(paths: List[Path], rank: int, model_parallel_size: int, vocab_parallel_embedding: bool) -> Dict[str, torch.Tensor]:
    """The state_dict this rank needs: its own shard when counts match, else slices of the mmap'd shards."""
    if len(paths) == model_parallel_size:
        return load_shard(paths[rank])
    return resharded_state_dict([load_shard(p) for p in paths], rank, model_parallel_size, vocab_parallel_embedding)


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


def tensor_shape(state_dict: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    """A weight's shape, without reading it where the state_dict can tell (a converted source's
    shard, llama.checkpoints.source.ConvertedShard, reads each tensor when accessed)."""
    shape = getattr(state_dict, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(state_dict[key].shape)
