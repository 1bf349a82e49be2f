"""The public entry point: Llama.build, generate, text_completion and chat_completion (Meta's API)."""

import logging
import os
import sys
import time
from typing import Iterator, List, Optional, Set, Tuple, TypedDict, Union

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank

import llama.kernels as kernels
from llama.args import (
    FAMILY_DEFAULTS,
    CheckpointError,
    ModelArgs,
    check_sampling_args,
    ffn_hidden_dim,
)
from llama.chat_format import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    DialogFormat,
    Message,
    NoChatFormat,
    Role,
    chat_format_for,
)  # fmt: skip
from llama.checkpoints.load import load_into
from llama.checkpoints.meta import check_model_parallel_size, tensor_shape
from llama.checkpoints.source import open_checkpoint, open_tokenizer
from llama.decoding.loop import DecodeRun, sample_top_p
from llama.decoding.stream import StreamEvent, stream_events
from llama.layers.compact import fuse_projections
from llama.layers.decode_step import native_decode
from llama.layers.linear import check_int4_columns, check_weight_format
from llama.model import Transformer
from llama.runtime.distributed import (
    check_world_holds,
    default_device_and_dtype,
    init_model_parallel,
    model_parallel_size_to_use,
    select_device,
    select_dtype,
    wait_for_every_rank_to_load,
)
from llama.runtime.host import cache_root, configure_threads
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Meta's names, importable from here as from Meta's llama/generation.py (Llama 2's defines the chat tags too).
__all__ = [
    "B_INST", "B_SYS", "E_INST", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR", "ChatPrediction", "CompletionPrediction",
    "Dialog", "Llama", "Message", "Role", "sample_top_p",
]  # fmt: skip

class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        weight_format: Optional[str] = None,
        compile: bool = False,
        threads: Optional[int] = None,
    ) -> "Llama":
        """Load a checkpoint and its tokenizer; one process per model-parallel shard.

        ckpt_dir is a Meta folder (params.json + consolidated.NN.pth), or a Hugging Face Llama
        folder or llama.cpp .gguf file, converted in memory. tokenizer_path may be None to use
        the checkpoint's own (a Meta folder's tokenizer file, or a converted source's vocabulary).
        Any number of processes that divides the heads can load any number of shards.

        device defaults to this process's GPU, else the CPU; dtype (the compute dtype) to bf16 on
        GPUs that have it (fp16 otherwise) and float32 on the CPU. weight_format stores the linear
        layers' weights compactly for faster decoding, at some accuracy: "bf16", "int8" (per
        output channel) or "int4" (groups of 32 columns); a GGUF file's Q4_0/Q4_1 blocks load
        as they are under "int4", its Q8_0 blocks under "int8" and "int4"; None keeps Meta's exact
        numerics and dequantizes a GGUF (see llama.layers.linear). On the CPU, a decode step
        runs its layers in one native call where the weights allow (fp32, int8, int4; see
        llama.layers.decode_step). Elsewhere compile=True decodes with a torch.compile'd step
        (Transformer.step): compiled at the first generate, then faster; logits equal to float
        rounding. threads: CPU threads to compute
        with (default $LLAMA_NUM_THREADS, else the CPUs this process may use, see llama.runtime.host).
        All inputs are checked before any weight is read.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len and max_batch_size must be positive, got {max_seq_len} and {max_batch_size}")
        check_weight_format(weight_format)
        mp_size = model_parallel_size_to_use(model_parallel_size)
        source = open_checkpoint(ckpt_dir)
        params = source.params
        tokenizer = open_tokenizer(source, tokenizer_path)
        tokenizer_path = tokenizer_path or "the checkpoint's own tokenizer"
        model_args = ModelArgs.from_params(
            {**FAMILY_DEFAULTS[tokenizer.family], **params}, source.params_file,
            max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        )
        _check_vocab(model_args, tokenizer, tokenizer_path, ckpt_dir)
        model_args.vocab_size = tokenizer.n_words
        check_model_parallel_size(
            model_args.n_heads, model_args.n_kv_heads or model_args.n_heads,
            model_args.vocab_size if model_args.vocab_parallel_embedding else model_args.dim, mp_size, ckpt_dir,
        )
        if weight_format == "int4":
            check_int4_columns(_local_in_features(model_args, mp_size), mp_size)
        check_world_holds(mp_size)
        device = select_device(device)
        dtype = select_dtype(device, dtype)
        kernels.set_num_threads(configure_threads(threads))
        if compile and device.type == "cpu":
            _check_cpp_compiler()
        if compile:
            # Inductor's compiled code is cached across runs; keep it with this project's other caches
            # (torch's default is a folder in /tmp, which many systems empty at boot).
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))

        init_model_parallel(mp_size, device)
        # The seed must be the same in all processes: they sample the same tokens.
        torch.manual_seed(seed)
        if int(os.environ.get("LOCAL_RANK", 0)) > 0:
            sys.stdout = open(os.devnull, "w")  # as Meta's: only the first process prints

        start_time = time.time()
        rank = get_model_parallel_rank()
        ckpt_path = source.file_for_errors(rank, mp_size)
        checkpoint = source.state_dict_for(rank, mp_size, model_args.vocab_parallel_embedding)
        _check_embedding_shape(checkpoint, model_args, mp_size, ckpt_path, tokenizer_path)
        with default_device_and_dtype(device, dtype):
            model = Transformer(model_args, compile_decode=compile)
        load_into(model, checkpoint, ckpt_path, device, dtype, weight_format)
        del checkpoint
        if weight_format is not None:
            fuse_projections(model)
        if compile and native_decode(model) is not None:
            logger.info("compile=True: not needed here, every decode step runs its layers in one native call (llama.kernels.decode)")
        elif compile:
            logger.info("The decode step is compiled with torch.compile at the first generation: expect a pause (up to a minute on a small CPU).")
        wait_for_every_rank_to_load()  # a slow load must not count against the first step's timeout
        logger.info(
            "Loaded %s in %.2f seconds (%s, %s%s)", ckpt_dir, time.time() - start_time, device, dtype,
            f", {weight_format} weights" if weight_format else "",
        )
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        try:
            self.formatter: Union[DialogFormat, NoChatFormat] = chat_format_for(tokenizer)
        except ValueError as e:
            # Text completion needs no chat format: a tokenizer without one (a plain byte-level
            # BPE vocabulary) still builds, and refuses dialogs with the reason.
            self.formatter = NoChatFormat(str(e))

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until a stop token or max_gen_len new tokens (Meta's algorithm).

        Each step samples one token for every row in Meta's order, so a seed gives the same tokens
        as Meta's code (see DecodeRun for how ragged batches are sped up without changing them).
        Returns the new tokens (with the prompt if echo) and, if logprobs, the log-probability of
        each returned token.
        """
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        run = DecodeRun(self.model, self.tokenizer, prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        answers: List[List[int]] = [[] for _ in prompt_tokens]
        answer_logprobs: List[List[float]] = [[] for _ in prompt_tokens]
        for step in run:  # drained: the last steps may still score a ragged batch's prompts
            for i, answer in step.items():
                if answer.token is not None:
                    answers[i].append(answer.token)
                    answer_logprobs[i].append(answer.logprob)
        if echo:
            prompt_logprobs = run.prompt_logprobs() if logprobs else [[] for _ in prompt_tokens]
            answers, answer_logprobs = _echoed(prompt_tokens, prompt_logprobs, answers, answer_logprobs, self.tokenizer.stop_tokens)
        return answers, (answer_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Continue each prompt text; see generate for the arguments."""
        prompt_tokens = self._encode_prompts(prompts, "text_completion")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo
        )
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": logprobs_i}
                for t, logprobs_i in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the chat format of the tokenizer's family.

        A Llama 2 dialog containing the format's own tags ([INST], <<SYS>>...) gets Meta's error
        text as its answer instead of the model's.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens, refusals = self._encode_dialogs(dialogs)
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs
        )
        results: List[ChatPrediction] = []
        for i, t in enumerate(generation_tokens):
            content = refusals[i] or self.tokenizer.decode(t)
            result: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in t]
                result["logprobs"] = generation_logprobs[i]
            results.append(result)
        return results

    def stream_text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> Iterator[StreamEvent]:
        """text_completion as a generator of StreamEvent, one per new token of each prompt (index
        = position in prompts); same tokens as text_completion for the same seed."""
        prompt_tokens = self._encode_prompts(prompts, "stream_text_completion")
        return self._stream(prompt_tokens, temperature, top_p, max_gen_len, logprobs, [None] * len(prompts))

    def stream_chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> Iterator[StreamEvent]:
        """chat_completion as a generator of StreamEvent (see stream_text_completion)."""
        prompt_tokens, refusals = self._encode_dialogs(dialogs)
        return self._stream(prompt_tokens, temperature, top_p, max_gen_len, logprobs, refusals)

    def _encode_prompts(self, prompts: List[str], caller: str) -> List[List[int]]:
        """Each prompt text as tokens after BOS, as Meta's text_completion encodes it."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, e.g. {caller}(['I believe the meaning of life is'])")
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

    def _encode_dialogs(self, dialogs: List[Dialog]) -> Tuple[List[List[int]], List[Optional[str]]]:
        """Each dialog's prompt tokens, and its refusal: Meta's UNSAFE_ERROR, the answer Llama 2
        gives in place of the model's to a dialog holding the chat format's own tags, else None."""
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        refusals = [UNSAFE_ERROR if self.formatter.has_special_tags(dialog) else None for dialog in dialogs]
        return prompt_tokens, refusals

    def _stream(
        self,
        prompt_tokens: List[List[int]],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        logprobs: bool,
        refusals: List[Optional[str]],
    ) -> Iterator[StreamEvent]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        # Checked here, before the first next(), so bad input fails at the call.
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        run = DecodeRun(self.model, self.tokenizer, prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        return stream_events(run, self.tokenizer, refusals)

    def _check_generate_args(
        self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float, top_p: float, logprobs: bool, echo: bool = False
    ) -> None:
        check_sampling_args(temperature, top_p, max_gen_len)
        for name, flag in (("logprobs", logprobs), ("echo", echo)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r} ({type(flag).__name__})")
        params = self.model.params
        if not prompt_tokens:
            raise ValueError("no prompts given: pass at least one")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"got {len(prompt_tokens)} prompts but the model was built with max_batch_size={params.max_batch_size}: "
                f"pass max_batch_size={len(prompt_tokens)} (or more) to Llama.build / --max_batch_size, "
                f"or send the prompts in batches of {params.max_batch_size}"
            )
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (text prompts get BOS)")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(t)} tokens long, more than max_seq_len={params.max_seq_len}: "
                    f"pass a larger max_seq_len to Llama.build / --max_seq_len, or shorten the prompt"
                )
            bad = [x for x in t if not 0 <= x < self.tokenizer.n_words]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.tokenizer.n_words}): {bad[:5]}")


def _echoed(
    prompt_tokens: List[List[int]],
    prompt_logprobs: List[List[float]],
    answers: List[List[int]],
    answer_logprobs: List[List[float]],
    stop_tokens: Set[int],
) -> Tuple[List[List[int]], List[List[float]]]:
    """Meta's echo: each prompt followed by its answer, the whole cut before its first stop token
    (so a prompt holding one is cut too, and loses its answer)."""
    out_tokens, out_logprobs = [], []
    for prompt, prompt_lp, answer, answer_lp in zip(prompt_tokens, prompt_logprobs, answers, answer_logprobs):
        tokens = prompt + answer
        cut = next((j for j, t in enumerate(tokens) if t in stop_tokens), len(tokens))
        out_tokens.append(tokens[:cut])
        out_logprobs.append((prompt_lp + answer_lp)[:cut])
    return out_tokens, out_logprobs


def _check_cpp_compiler() -> None:
    """torch.compile builds C++ for the CPU: say so now, not deep inside the first generation."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:
        raise RuntimeError(
            "compile=True on the CPU needs a C++ compiler for torch.compile (g++ or clang++; the CXX "
            "environment variable picks one): install one, or run without compile"
        ) from e


def _check_vocab(args: ModelArgs, tokenizer: Tokenizer, tokenizer_path: str, ckpt_dir: str) -> None:
    if args.vocab_size > 0 and args.vocab_size != tokenizer.n_words:
        raise CheckpointError(
            f"the tokenizer {tokenizer_path!r} ({tokenizer.family}, {tokenizer.n_words} tokens) does not belong to the "
            f"checkpoint {ckpt_dir!r} (params.json vocab_size={args.vocab_size}); pass the tokenizer.model that came with these weights"
        )


def _local_in_features(args: ModelArgs, mp_size: int) -> dict:
    """The input columns one process holds of each kind of linear weight (row-parallel ones split them)."""
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    return {
        "wq/wk/wv/w1/w3/output": args.dim,
        "attention.wo": args.dim // mp_size,
        "feed_forward.w2": hidden // mp_size,
    }


def _check_embedding_shape(checkpoint: dict, args: ModelArgs, mp_size: int, path, tokenizer_path: str) -> None:
    """The embedding's vocabulary side tells a wrong tokenizer apart from a right one (Llama 2 has no vocab_size)."""
    if "tok_embeddings.weight" not in checkpoint:
        return  # load_into names the missing weight
    rows = tensor_shape(checkpoint, "tok_embeddings.weight")[0] * (mp_size if args.vocab_parallel_embedding else 1)
    if rows != args.vocab_size:
        raise CheckpointError(
            f"the tokenizer {tokenizer_path!r} has {args.vocab_size} tokens but {path} embeds {rows}: "
            "they do not belong together (a Llama 2 tokenizer with a Llama 3 checkpoint, or the reverse?); "
            "pass the tokenizer.model that came with these weights"
        )
