"""Checkpoint conversion: Hugging Face Llama folders and llama.cpp GGUF files to Meta folders, and Meta to HF.

    from llama.checkpoints.convert import convert_to_meta, convert_meta_to_hf
    convert_to_meta("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-meta/")
    convert_to_meta("Llama-3.1-8B-hf/", "llama-3.1-8b-mp2/", model_parallel_size=2)
    convert_meta_to_hf("llama-2-7b/", "llama-2-7b-hf/")

A Meta folder is params.json, consolidated.NN.pth shards, the tokenizer file and checklist.chk.
Tensors are streamed one at a time from memory-mapped sources; output is written to a staging
folder beside dst and renamed into place only when complete (llama.checkpoints.output_folder).
"""

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from llama.args import CheckpointError
from llama.checkpoints.hf import config_from_params, write_hf_weights
from llama.checkpoints.meta import TOKENIZER_FILES
from llama.checkpoints.output_folder import staged_output, write_checklist
from llama.checkpoints.source import detect_format, read_as_meta
from llama.checkpoints.tensors import (
    check_parallel_split,
    params_json_for,
    read_meta_folder,
    vocab_parallel_for,
    write_meta_shards,
    write_params,
)
from llama.runtime.distributed import dtype_named
from llama.tokenizer import Tokenizer
from llama.tokenizers.convert import write_tokenizer_from_gguf, write_tokenizer_from_hf

__all__ = ["convert_meta_to_hf", "convert_to_meta"]

PathLike = Union[str, Path]

OVERWRITE_FLAG = "overwrite=True (--force)"


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
    return write_tokenizer_from_hf(src, out) if kind == "hf" else write_tokenizer_from_gguf(src, out)


def _special_ids(tokenizer_files) -> Dict[str, Optional[int]]:
    """bos/eos ids for config.json from the tokenizer file our Tokenizer reads, if there is one
    (null for a token the vocabulary lacks, as transformers writes it; our Tokenizer says -1)."""
    for path in tokenizer_files:
        try:
            tokenizer = Tokenizer(str(path))
        except ValueError:
            continue
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        return {key: (i if i >= 0 else None) for key, i in ids.items()}
    return {}


def _torch_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    return None if dtype is None else dtype_named(dtype)
