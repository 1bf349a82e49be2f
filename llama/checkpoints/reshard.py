"""A copy of a Meta checkpoint folder cut into a different number of shards (llama-reshard).

Output shards are written one at a time from memory-mapped inputs, so memory stays near the
largest output shard. The source's other files (params.json, tokenizer files, licence) are
copied; checklist.chk is regenerated. The output is staged and swapped in whole
(llama.checkpoints.output_folder): an interrupted run leaves the output folder as it was.
"""

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import List

import torch

from llama.args import CheckpointError, ModelArgs
from llama.checkpoints.meta import check_model_parallel_size, resharded_state_dict
from llama.checkpoints.output_folder import staged_output, write_checklist
from llama.checkpoints.tensors import open_meta_folder

logger = logging.getLogger(__name__)

# Weights in any format: the shards are rewritten, and other weights have no place in a Meta folder.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".gguf")


def model_files(ckpt_dir: Path) -> List[Path]:
    """The files of a checkpoint folder that go into its copy unchanged: params.json, tokenizer files,
    licence and the like; not weights, checklist.chk (regenerated) or hidden files."""
    files = [p for p in sorted(ckpt_dir.iterdir()) if p.is_file() and not p.name.startswith(".") and p.name != "checklist.chk"]
    skipped = [p.name for p in files if p.suffix in WEIGHT_SUFFIXES and p.suffix != ".pth"]
    if skipped:
        logger.warning("Not copying %s from %s: weights that are not consolidated.NN.pth shards", ", ".join(skipped), ckpt_dir)
    return [p for p in files if p.suffix not in WEIGHT_SUFFIXES]


def reshard(ckpt_dir: str, output_dir: str, model_parallel_size: int, overwrite: bool = False) -> Path:
    """Write ckpt_dir's weights as model_parallel_size shards into output_dir; returns output_dir.

    Raises CheckpointError if model_parallel_size does not divide the heads or the embedding's
    split side (the message lists the sizes that work), FileExistsError if output_dir is not empty
    and not overwrite, OutputFolderError if output_dir is, holds or lies inside ckpt_dir.
    """
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise CheckpointError(f"--model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    params, shards, vocab_parallel, _ = open_meta_folder(Path(ckpt_dir))
    embedding = shards[0]["tok_embeddings.weight"]
    args = ModelArgs.from_params(params, vocab_size=max(params.get("vocab_size", -1), 1))
    split_size = embedding.shape[0] * len(shards) if vocab_parallel else embedding.shape[1] * len(shards)
    check_model_parallel_size(
        args.n_heads, args.n_kv_heads or args.n_heads, split_size, model_parallel_size, ckpt_dir,
        remedy="llama-reshard ... --model_parallel_size {n}",
    )

    with staged_output(output_dir, sources=[ckpt_dir], overwrite=overwrite, overwrite_flag="--overwrite True") as out:
        for path in model_files(Path(ckpt_dir)):
            shutil.copy2(path, out / path.name)
        start = time.time()
        for rank in range(model_parallel_size):
            state_dict = resharded_state_dict(shards, rank, model_parallel_size, vocab_parallel)
            # clone: torch.save of a narrow view would write the whole underlying storage.
            torch.save({k: v.clone() for k, v in state_dict.items()}, out / f"consolidated.{rank:02d}.pth")
            del state_dict
            print(f"llama-reshard: wrote shard {rank + 1}/{model_parallel_size} ({time.time() - start:.1f} s)", file=sys.stderr, flush=True)
        write_checklist(out)
    return Path(output_dir)
