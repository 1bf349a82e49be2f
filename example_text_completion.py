"""Continue a few prompts with a pretrained model (Meta's example, runnable with or without torchrun).

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
"""

import logging
from typing import List, Optional

import fire

from llama import Llama
from llama.args import check_sampling_args
from llama.cli.demo import checkpoint_or_demo, demo_settings
from llama.cli.errors import reported_errors
from llama.decoding.stream import print_in_order


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    weight_format: Optional[str] = None,
    compile: bool = False,
    stream: Optional[bool] = None,
    threads: Optional[int] = None,
):
    """
    Pretrained (not chat-tuned) models continue text: each prompt is the start of a text.
    `max_gen_len` bounds the continuation, since pretrained models rarely stop by themselves.
    `device` (cuda, cpu, mps) and `dtype` (bf16, fp16, fp32) override the automatic choice.
    `weight_format` (bf16, int8, int4) stores the weights compactly: faster decoding, close but not exact
    (a GGUF file's Q4_0/Q4_1 blocks load as they are with int4, its Q8_0 blocks with int8).
    `compile` compiles the decode step with torch.compile: slower start, faster tokens.
    `stream` prints answers as they are generated (the default for the demo model).
    `threads` sets the CPU threads (default: the CPUs this process may use; or LLAMA_NUM_THREADS).
    Without --ckpt_dir, a small demo chat model is used (see llama/cli/demo.py); without
    --tokenizer_path, the checkpoint's own tokenizer file. Errors are one line; LLAMA_DEBUG=1
    shows their traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_sampling_args(temperature, top_p, max_gen_len)
    if ckpt_dir is None:
        max_gen_len, stream = demo_settings(max_gen_len, stream)
    generator = Llama.build(
        ckpt_dir=checkpoint_or_demo(ckpt_dir),
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        model_parallel_size=model_parallel_size,
        device=device,
        dtype=dtype,
        weight_format=weight_format,
        compile=compile,
        threads=threads,
    )

    prompts: List[str] = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,
        
        I just """,
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:
        
        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start : start + max_batch_size]
        if stream:
            events = generator.stream_text_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
            print_in_order(events, [f"{p}\n> " for p in batch], "\n\n==================================\n")
            continue
        results = generator.text_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for prompt, result in zip(batch, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
