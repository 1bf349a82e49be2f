"""A torchrun job whose rank $FREEZE_RANK stops itself (SIGSTOP: alive, never answering) after
loading, for test_torchrun's hang test. Run as a command, like the examples.

    FREEZE_RANK=1 torchrun --nproc_per_node 2 tests/frozen_rank.py CKPT_DIR TOKENIZER_PATH
"""

import os
import signal
import sys

from llama import Llama
from llama.cli.errors import reported_errors


def main(ckpt_dir: str, tokenizer_path: str) -> None:
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=1)
    if os.environ["RANK"] == os.environ["FREEZE_RANK"]:
        os.kill(os.getpid(), signal.SIGSTOP)
    generator.text_completion(["I believe the meaning of life is"], max_gen_len=4, temperature=0)


if __name__ == "__main__":
    with reported_errors():
        main(*sys.argv[1:])
