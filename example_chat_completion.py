"""Answer a few dialogs with a chat model (Meta's example, runnable with or without torchrun).

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
"""

import logging
from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.args import check_sampling_args
from llama.cli.demo import checkpoint_or_demo, demo_settings
from llama.cli.errors import reported_errors
from llama.decoding.stream import print_in_order


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    weight_format: Optional[str] = None,
    compile: bool = False,
    stream: Optional[bool] = None,
    threads: Optional[int] = None,
):
    """
    Chat-tuned models answer dialogs: turns of user and assistant, optionally opened by a system
    message, and always ending with the user. `max_gen_len` is optional because chat models stop
    by themselves. Dialogs are answered in batches of `max_batch_size`.
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

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {"role": "system", "content": "Always answer with emojis"},
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
        [
            {
                "role": "system",
                "content": """\
You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.""",
            },
            {"role": "user", "content": "Write a brief birthday message to John"},
        ],
        [
            {"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"},
        ],
    ]
    for start in range(0, len(dialogs), max_batch_size):
        batch = dialogs[start : start + max_batch_size]
        if stream:
            headers = ["".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in d) + "> Assistant: " for d in batch]
            events = generator.stream_chat_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
            print_in_order(events, headers, "\n\n==================================\n")
            continue
        results = generator.chat_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for dialog, result in zip(batch, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
