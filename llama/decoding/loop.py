"""The generation loop in gpt-fast's shape (prefill, decode one token, the loop, sampling) and the
rules that end an answer, written once: generate, the completions and both stream APIs read the
steps of a DecodeRun."""

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.layers.linear import few_rows_on_kernels
from llama.model import Transformer
from llama.runtime.host import torch_threads
from llama.tokenizer import Tokenizer


class AnswerStep(NamedTuple):
    """What one step did to one row's answer.

    token: the new answer token, None when the answer ends without one (a stop token, which is
    not part of the answer, or no room for any token); logprob: its log-probability (None without
    a token or unless asked for); ended: no token follows in this answer.
    """

    token: Optional[int]
    logprob: Optional[float]
    ended: bool


class DecodeRun:
    """One generation run over a batch of prompts (Meta's algorithm), iterated one step at a time.

    Each step yields {row: AnswerStep}, in row order, for the rows whose answer it changed. A
    row's answer is what follows its prompt, at most max_gen_len tokens and up to max_seq_len,
    ended before the first stop token; each row gets exactly one ended=True, in a first step
    before any model call when it has no room to answer (max_gen_len 0, or a prompt filling
    max_seq_len). A caller may stop once every answer has ended; the remaining steps (if any)
    only score ragged prompts for prompt_logprobs.

    Meta's loop starts every row at the shortest prompt and feeds the longer prompts through
    one-token steps, drawing samples it throws away. Rows start at their own prompt end instead
    whenever that draws the same random numbers as Meta's: always when greedy (no draws), and
    when all prompts have one length. Sampling a ragged batch keeps Meta's common start, so a
    seed gives Meta's tokens.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
    ):
        self.model, self.temperature, self.top_p = model, temperature, top_p
        self.prompt_lens = prompt_lens = [len(t) for t in prompt_tokens]
        self.min_prompt_len = min(prompt_lens)
        self.total_len = min(model.params.max_seq_len, max_gen_len + max(prompt_lens))
        device = model.norm.weight.device

        self.pad_id = pad_id = tokenizer.pad_id
        self.prompts = torch.full((len(prompt_tokens), self.total_len), pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            self.prompts[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        self.in_prompt = self.prompts != pad_id
        self.token_logprobs = torch.zeros_like(self.prompts, dtype=torch.float) if logprobs else None
        self.stop_tokens = frozenset(tokenizer.stop_tokens)

        own_start = temperature == 0 or len(set(prompt_lens)) == 1
        self.starts = prompt_lens if own_start else [self.min_prompt_len] * len(prompt_lens)
        # The column after each row's last answer token: Meta trims anything past prompt + max_gen_len.
        self.ends = [min(n + max_gen_len, self.total_len) for n in prompt_lens]
        # One torch thread during decode steps whose products have their own threads (see torch_threads).
        self.decode_threads = 1 if few_rows_on_kernels(model.output) else None
        self._steps = self._loop()

    def __iter__(self) -> "DecodeRun":
        return self

    def __next__(self) -> Dict[int, AnswerStep]:
        return next(self._steps)

    def prompt_logprobs(self) -> List[List[float]]:
        """After the run, with logprobs: log p of each prompt token given those before it (0 for the first)."""
        if self.token_logprobs is None:
            raise ValueError("prompt_logprobs() needs a DecodeRun made with logprobs=True")
        return [row[:n] for row, n in zip(self.token_logprobs.tolist(), self.prompt_lens)]

    @torch.inference_mode()
    def _loop(self) -> Iterator[Dict[int, AnswerStep]]:
        bsz = len(self.prompt_lens)
        ended = [end <= n for end, n in zip(self.ends, self.prompt_lens)]  # no room for an answer
        if any(ended):
            yield {i: AnswerStep(None, None, True) for i in range(bsz) if ended[i]}
        if self.min_prompt_len == self.total_len:
            if self.token_logprobs is not None:
                # Nothing to generate: score the prompts. (Meta's code scores logits[i] against
                # token i here; we use token i + 1, as everywhere else.)
                logits = self.model.step(self.prompts, 0, last_only=False)
                self.token_logprobs[:, 1:] = _token_logprobs(logits[:, :-1], self.prompts[:, 1:], self.pad_id)
            return

        device = self.prompts.device
        rows = torch.arange(bsz, device=device)
        ends = torch.tensor(self.ends, device=device)
        pos = list(self.starts)  # the column each row fills next, on the host for the ending rules
        pos_t = torch.tensor(pos, device=device)  # and on the device for the model
        stopped = [False] * bsz  # the row's answer met a stop token
        last_logits = self._prefill()
        while True:
            # Sampling runs with the decode steps' torch threads too: an argmax over the vocabulary on
            # two threads wakes torch's OpenMP worker, which then spins through the next step beside
            # the kernels' threads (14% of a batch-4 SmolLM2 run's samples on 2 Zen 5 cores).
            with torch_threads(self.decode_threads):
                col = pos_t.clamp(max=self.total_len - 1)
                next_token, logprob = self._next_token(last_logits, rows, col)
                if logprob is not None:
                    active = pos_t < ends
                    self.token_logprobs[rows[active], pos_t[active]] = logprob[active]  # prompt_logprobs reads them
            step = self._answer_steps(pos, next_token.tolist(), None if logprob is None else logprob.tolist(), ended)
            for i, answer in step.items():
                ended[i] = answer.ended
                stopped[i] = answer.token is None
            yield step
            if all(stopped[i] or pos[i] + 1 >= self.ends[i] for i in range(bsz)):
                return
            last_logits = self._decode(next_token, col)
            pos, pos_t = [p + 1 for p in pos], pos_t + 1

    def _next_token(self, last_logits: torch.Tensor, rows: torch.Tensor, col: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Each row's token at column col (bsz,): sampled, or the prompt's own while the row is
        still inside its prompt; with its log-probability (bsz,) when logprobs were asked for."""
        next_token = _sample(last_logits, self.temperature, self.top_p)
        next_token = torch.where(self.in_prompt[rows, col], self.prompts[rows, col], next_token)
        if self.token_logprobs is None:
            return next_token, None
        return next_token, _token_logprobs(last_logits[:, None], next_token[:, None], self.pad_id)[:, 0].float()

    def _answer_steps(
        self, pos: List[int], tokens: List[int], logprobs: Optional[List[float]], ended: List[bool]
    ) -> Dict[int, AnswerStep]:
        """The ending rules, for the token each row drew at column pos: a stop token ends the answer
        without joining it; the token at the row's end column (prompt + max_gen_len, or
        max_seq_len) is its last. Rows inside their prompt or past their answer get no entry."""
        step = {}
        for i, (col, token) in enumerate(zip(pos, tokens)):
            if ended[i] or col < self.prompt_lens[i]:
                continue
            if token in self.stop_tokens:
                step[i] = AnswerStep(None, None, True)
            else:
                step[i] = AnswerStep(token, logprobs[i] if logprobs is not None else None, col + 1 >= self.ends[i])
        return step

    def _prefill(self) -> torch.Tensor:
        """Run each row's tokens before its start through the model -> last logits (bsz, vocab).

        Rows are prefilled one run of equal starts at a time, so a ragged batch costs its own
        tokens, not bsz times the longest prompt.
        """
        prompts, token_logprobs = self.prompts, self.token_logprobs
        last = []
        row = 0
        while row < len(self.starts):
            n = self.starts[row]
            run = 1
            while row + run < len(self.starts) and self.starts[row + run] == n:
                run += 1
            logits = self.model.step(prompts[row : row + run, :n], 0, cache_row=row, last_only=token_logprobs is None)
            if token_logprobs is not None:
                token_logprobs[row : row + run, 1:n] = _token_logprobs(logits[:, :-1], prompts[row : row + run, 1:n], self.pad_id)
            last.append(logits[:, -1])
            row += run
        return torch.cat(last)

    def _decode(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row at its position -> next logits (bsz, vocab)."""
        with torch_threads(self.decode_threads):
            return self.model.step(token[:, None], pos)[:, -1]


def _sample(last_logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(bsz, vocab) logits of the last position -> (bsz,) next tokens: argmax, or a top-p sample."""
    if temperature > 0:
        probs = torch.softmax(last_logits / temperature, dim=-1)
        return _sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(last_logits, dim=-1).reshape(-1)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log p(target) for each position: logits (bsz, seqlen, vocab), targets (bsz, seqlen); 0 at pads."""
    return -F.cross_entropy(input=logits.transpose(1, 2), target=targets, reduction="none", ignore_index=pad_id)


# How many of the most likely tokens _sample_top_p looks among for the nucleus, in turn.
_CANDIDATES = (256, 4096)


def _sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """sample_top_p's draw (the same token and random numbers) without sorting the vocabulary.

    sample_top_p sorts every probability to find the few that the nucleus keeps: ~1.5 ms a row
    for SmolLM2's 49152 tokens on a 2-core EPYC, a fifth of an int4 decode step. Here the most
    likely candidates come from topk, in the same descending order of the same values: their
    cumulative sums, mask and normalisation are sample_top_p's bit for bit, in a vector of the
    vocabulary's length (zeros past the nucleus), so torch.multinomial draws the same position
    from it. sample_top_p itself runs where that could differ: the nucleus may reach past the
    candidates, or equal probabilities in it, which sort and topk may order differently.
    """
    vocab = probs.shape[-1]
    for k in _CANDIDATES:
        if k >= vocab or probs.dtype != torch.float32:
            break
        top, index = torch.topk(probs, k, dim=-1)
        probs_sum = torch.cumsum(top, dim=-1)
        kept = probs_sum - top <= p
        count = kept.sum(dim=-1, keepdim=True)
        # Past the candidates sample_top_p keeps nothing when they already add up past p: 1e-6
        # above p covers its float rounding (below 1e-7 on sums of at most 1).
        if not bool((probs_sum[:, -1:] > p + 1e-6).all()) or bool((count >= k).any()):
            continue
        tied = (top[:, 1:] == top[:, :-1]) & (torch.arange(1, k, device=probs.device) <= count)
        if bool(tied.any()):
            break
        probs_sort = torch.zeros_like(probs)
        probs_sort[:, :k] = top.masked_fill_(~kept, 0.0)
        probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
        next_token = torch.multinomial(probs_sort, num_samples=1)
        return torch.gather(index, -1, next_token)
    return sample_top_p(probs, p)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability adds up to more than p.

    probs (bsz, vocab) -> token ids (bsz, 1).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)
