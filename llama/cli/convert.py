"""llama-convert: Hugging Face Llama folders and GGUF files to Meta folders, and Meta folders to Hugging Face.

    llama-convert Llama-3.1-8B-Instruct/ llama-3.1-8b-instruct/                  # HF -> Meta, 1 shard
    llama-convert Llama-2-70b-hf/ llama-2-70b/ --model_parallel_size 8           # HF -> Meta, 8 shards
    llama-convert "$(python -m llama.cli.demo)" smollm2/ --dtype bf16              # GGUF -> Meta (the demo's file)
    llama-convert llama-2-7b/ llama-2-7b-hf/                                     # Meta -> HF (--to hf)

The direction follows the source: Meta folders become Hugging Face folders, anything else a Meta
folder; --to meta|hf makes it explicit. --force replaces a non-empty output folder.
"""

from typing import Optional

import fire

from llama.checkpoints.convert import convert_meta_to_hf, convert_to_meta
from llama.checkpoints.source import detect_format
from llama.cli.errors import reported_errors


def main(
    src: str,
    dst: str,
    to: Optional[str] = None,
    model_parallel_size: int = 1,
    dtype: Optional[str] = None,
    force: bool = False,
    overwrite: bool = False,
    tokenizer: bool = True,
) -> None:
    """Convert src into dst.

    Args:
        src: a Hugging Face folder (config.json + weights), a .gguf file or a Meta folder.
        dst: the folder to create.
        to: "meta" or "hf"; default: "hf" for a Meta source, else "meta".
        model_parallel_size: number of consolidated.NN.pth shards to write (to meta).
        dtype: bf16, fp16 or fp32 for the written weights (to meta); default: the source's.
        force / overwrite: replace dst if it exists and is not empty.
        tokenizer: --notokenizer writes the weights only (to meta).
    """
    kind = detect_format(src)
    target = to or ("hf" if kind == "meta" else "meta")
    if target not in ("meta", "hf"):
        raise ValueError(f"--to must be 'meta' or 'hf', got {to!r}")
    if target == "hf":
        if model_parallel_size != 1 or dtype is not None or not tokenizer:
            raise ValueError("--model_parallel_size, --dtype and --notokenizer apply to conversions to Meta folders only")
        convert_meta_to_hf(src, dst, overwrite=force or overwrite)
    else:
        convert_to_meta(src, dst, model_parallel_size, overwrite=force or overwrite, dtype=dtype, tokenizer=tokenizer)
    print(f"llama-convert: wrote {dst}")


def cli() -> None:
    with reported_errors():
        fire.Fire(main)


if __name__ == "__main__":
    cli()
