"""Checkpoint conversion: Hugging Face Llama folders and llama.cpp GGUF files to Meta folders, and Meta to HF.

    from llama.convert import convert_to_meta, convert_meta_to_hf
    convert_to_meta("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-meta/")
    convert_to_meta("Llama-3.1-8B-hf/", "llama-3.1-8b-mp2/", model_parallel_size=2)
    convert_meta_to_hf("llama-2-7b/", "llama-2-7b-hf/")

A Meta folder is params.json, consolidated.NN.pth shards, the tokenizer file and checklist.chk.
Tensors are streamed one at a time from memory-mapped sources; output is written to a staging
folder beside dst and renamed into place only when complete (llama.output_folder).
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from llama.checkpoint import CheckpointError
from llama.convert.meta import (
    TOKENIZER_FILES,
    MetaTensors,
    check_parallel_split,
    params_json_for,
    read_meta_folder,
    vocab_parallel_for,
    write_meta_shards,
    write_params,
)
from llama.output_folder import staged_output, write_checklist

__all__ = ["CheckpointError", "MetaTensors", "convert_meta_to_hf", "convert_to_meta", "detect_format", "read_as_meta"]

PathLike = Union[str, Path]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
OVERWRITE_FLAG = "overwrite=True (--force)"
_KINDS = "a Hugging Face folder (config.json + weights), a .gguf file or a Meta folder (params.json + consolidated.*.pth)"


def detect_format(path: PathLike) -> str:
    """"meta", "hf" or "gguf": what kind of checkpoint path is.

    Raises FileNotFoundError if path does not exist, CheckpointError if it is none of the three.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(p)!r}; pass {_KINDS}")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{p} is not a GGUF file (it does not start with b'GGUF'); pass {_KINDS}")
    if (p / "params.json").is_file():
        return "meta"
    if (p / "config.json").is_file():
        return "hf"
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    hint = f"; to convert a GGUF file, pass the file itself, e.g. {str(p / ggufs[0])!r}" if ggufs else ""
    raise CheckpointError(f"{p} has neither params.json (Meta) nor config.json (Hugging Face){hint}; pass {_KINDS}")


def read_as_meta(src: PathLike) -> Tuple[Dict[str, Any], MetaTensors]:
    """(params, tensors) of any checkpoint kind, in Meta's terms, without writing anything.

    params is a params.json dict with a positive vocab_size and rope_theta filled in. tensors maps
    Meta's state_dict keys to full (unsharded) tensors, each read from the memory-mapped source
    (q/k rows re-ordered, GGUF quantizations dequantized) when accessed; output.weight is absent
    when the model ties it to tok_embeddings.weight (llama.checkpoint.load_into ties them).
    """
    p = Path(src)
    kind = detect_format(p)
    if kind == "hf":
        from llama.convert.hf import read_hf_as_meta

        return read_hf_as_meta(p)
    if kind == "gguf":
        from llama.convert.gguf import read_gguf_as_meta

        return read_gguf_as_meta(p)
    params, tensors, _ = read_meta_folder(p)
    return params, tensors


def convert_to_meta(
    src: PathLike,
    dst: PathLike,
    model_parallel_size: int = 1,
    overwrite: bool = False,
    *,
    dtype: Union[str, torch.dtype, None] = None,
    tokenizer: bool = True,
) -> Path:
    """Write a Hugging Face folder or GGUF file as a Meta folder with model_parallel_size shards; returns dst.

    dtype converts every weight (default: keep the source's; dequantized GGUF weights are float32).
    tokenizer=False writes the weights only; the embedding is then split by vocabulary (Llama 3's
    layout), which a Llama 2 tokenizer's loader does not expect for model_parallel_size > 1.

    Raises CheckpointError for a source our model cannot run (message names the field and value),
    FileExistsError if dst is not empty and not overwrite, OutputFolderError (a ValueError) if dst
    is, holds or lies inside src.
    """
    src_path, dst_path = Path(src), Path(dst)
    kind = detect_format(src_path)
    if kind == "meta":
        raise CheckpointError(f"{src_path} is already a Meta folder; use llama-reshard to change its shard count, or convert_meta_to_hf (llama-convert --to hf)")
    torch_dtype = _torch_dtype(dtype)
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise CheckpointError(f"model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    params, tensors = read_as_meta(src_path)
    with staged_output(dst_path, sources=[src_path], overwrite=overwrite, overwrite_flag=OVERWRITE_FLAG) as out:
        tokenizer_path = _write_tokenizer(kind, src_path, out) if tokenizer else None
        vocab_parallel = vocab_parallel_for(tokenizer_path)
        check_parallel_split(params, vocab_parallel, model_parallel_size, str(src_path))
        write_params(out, params_json_for(params, vocab_parallel))
        write_meta_shards(tensors, out, model_parallel_size, vocab_parallel, torch_dtype)
        write_checklist(out)
    return dst_path


def convert_meta_to_hf(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Write a Meta folder (any number of shards) as a Hugging Face LlamaForCausalLM folder; returns dst.

    dst gets config.json, model.safetensors (q/k rows in Hugging Face's rotate-half order, the
    dtype of the source) and the folder's tokenizer file(s), copied.

    Raises CheckpointError for an unusable Meta folder, FileExistsError if dst is not empty and not
    overwrite, OutputFolderError (a ValueError) if dst is, holds or lies inside src.
    """
    from llama.convert.hf import config_from_params, write_hf_weights

    src_path, dst_path = Path(src), Path(dst)
    kind = detect_format(src_path)
    if kind != "meta":
        raise CheckpointError(f"{src_path} is a {kind} checkpoint, not a Meta folder (params.json + consolidated.*.pth)")
    params, tensors, vocab_parallel = read_meta_folder(src_path)
    with staged_output(dst_path, sources=[src_path], overwrite=overwrite, overwrite_flag=OVERWRITE_FLAG) as out:
        tokenizer_files = [src_path / name for name in TOKENIZER_FILES if (src_path / name).is_file()]
        # A tokenizer.json comes with the tokenizer_config.json that holds its BOS/EOS and chat template.
        companions = [src_path / "tokenizer_config.json"]
        copied = tokenizer_files + [path for path in companions if path.is_file()]
        # Meta's files do not say the context length: Llama 2 trained on 4096, Llama 3 on 8192, 3.1 extends it to 128k.
        context_length = 131072 if params.get("use_scaled_rope") else 8192 if vocab_parallel else 4096
        dtype = tensors.spec("tok_embeddings.weight")[0]
        config = config_from_params(params, tensors.tied, dtype, context_length, _special_ids(tokenizer_files))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_hf_weights(params, tensors, out / "model.safetensors")
        for path in copied:
            shutil.copy2(path, out / path.name)
    return dst_path


def _write_tokenizer(kind: str, src: Path, out: Path) -> Path:
    from llama.tokenizer_convert import write_tokenizer_from_gguf, write_tokenizer_from_hf

    return write_tokenizer_from_hf(src, out) if kind == "hf" else write_tokenizer_from_gguf(src, out)


def _special_ids(tokenizer_files) -> Dict[str, Optional[int]]:
    """bos/eos ids for config.json from the tokenizer file our Tokenizer reads, if there is one
    (null for a token the vocabulary lacks, as transformers writes it; our Tokenizer says -1)."""
    from llama.tokenizer import Tokenizer

    for path in tokenizer_files:
        try:
            tokenizer = Tokenizer(str(path))
        except ValueError:
            continue
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        return {key: (i if i >= 0 else None) for key, i in ids.items()}
    return {}


def _torch_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
