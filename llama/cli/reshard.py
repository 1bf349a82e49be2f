"""llama-reshard: write a copy of a Meta checkpoint folder cut into a different number of shards.

    llama-reshard --ckpt_dir llama-2-70b/ --output_dir llama-2-70b-mp2/ --model_parallel_size 2
"""

import fire

from llama.checkpoints.reshard import reshard
from llama.cli.errors import reported_errors


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
