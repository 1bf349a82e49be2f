"""llama-reshard: write a copy of a Meta checkpoint folder cut into a different number of shards.

    llama-reshard --ckpt_dir llama-2-70b/ --output_dir llama-2-70b-mp2/ --model_parallel_size 2

Output shards are written one at a time from memory-mapped inputs, so memory stays near the
largest output shard. params.json and tokenizer files are copied; checklist.chk is regenerated.
"""

import hashlib
import logging
import shutil
import sys
import time
from pathlib import Path

import fire
import torch

from llama.args import ModelArgs
from llama.checkpoint import (
    CheckpointError,
    check_model_parallel_size,
    checkpoint_paths,
    load_shard,
    read_params,
    resharded_state_dict,
)
from llama.cli_errors import reported_errors

logger = logging.getLogger(__name__)

COPIED_FILES = ("params.json", "tokenizer.model")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checklist(folder: Path) -> None:
    """checklist.chk as Meta ships it: `<md5>  <filename>` for every other file in the folder."""
    lines = [f"{_md5(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file() and p.name != "checklist.chk"]
    (folder / "checklist.chk").write_text("".join(lines))


def reshard(ckpt_dir: str, output_dir: str, model_parallel_size: int, overwrite: bool = False) -> Path:
    """Write ckpt_dir's weights as model_parallel_size shards into output_dir; returns output_dir.

    Raises CheckpointError if model_parallel_size does not divide the heads or the embedding's
    split side (the message lists the sizes that work), FileExistsError if output_dir exists and
    not overwrite.
    """
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise CheckpointError(f"--model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    paths = checkpoint_paths(ckpt_dir)
    params = read_params(ckpt_dir)
    shards = [load_shard(p) for p in paths]  # memory-mapped: only the slices used are read
    embedding = shards[0].get("tok_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{paths[0]} has no tok_embeddings.weight; is it a Meta consolidated.NN.pth shard?")
    # Several shards show the split: Llama 2's ParallelEmbedding cuts the model dimension. One shard
    # cannot show it; Llama 3's params.json gives vocab_size, Llama 2's says -1.
    if len(paths) > 1:
        vocab_parallel = embedding.shape[1] == params.get("dim")
    else:
        vocab_parallel = params.get("vocab_size", -1) > 0
    args = ModelArgs.from_params(params, vocab_size=max(params.get("vocab_size", -1), 1))
    split_size = embedding.shape[0] * len(paths) if vocab_parallel else embedding.shape[1] * len(paths)
    check_model_parallel_size(
        args.n_heads, args.n_kv_heads or args.n_heads, split_size, model_parallel_size, ckpt_dir,
        remedy="llama-reshard ... --model_parallel_size {n}",
    )

    out = Path(output_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"output folder {output_dir!r} exists; pass --overwrite True to replace it, or choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED_FILES:
        if (Path(ckpt_dir) / name).is_file():
            shutil.copy2(Path(ckpt_dir) / name, out / name)

    start = time.time()
    for rank in range(model_parallel_size):
        state_dict = resharded_state_dict(shards, rank, model_parallel_size, vocab_parallel)
        # clone: torch.save of a narrow view would write the whole underlying storage.
        torch.save({k: v.clone() for k, v in state_dict.items()}, out / f"consolidated.{rank:02d}.pth")
        del state_dict
        print(f"llama-reshard: wrote shard {rank + 1}/{model_parallel_size} ({time.time() - start:.1f} s)", file=sys.stderr, flush=True)
    write_checklist(out)
    return out


def main(ckpt_dir: str, output_dir: str, model_parallel_size: int, overwrite: bool = False) -> None:
    """Write a copy of a Meta checkpoint folder cut into model_parallel_size shards.

    Args:
        ckpt_dir: the Meta folder to read (params.json + consolidated.NN.pth, as download.sh makes it).
        output_dir: the folder to create; it must not exist unless --overwrite True.
        model_parallel_size: the number of shards to write: the number of processes
            (torchrun --nproc_per_node) that will load the copy. It must divide the attention heads.
        overwrite: replace output_dir if it exists.
    """
    reshard(ckpt_dir, output_dir, model_parallel_size, overwrite)


def cli() -> None:
    with reported_errors():
        fire.Fire(main)


if __name__ == "__main__":
    cli()
