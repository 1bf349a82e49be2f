"""Streaming: turn the steps of a DecodeRun into per-token text events, one prompt per index."""

import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional

from llama.decoding.loop import DecodeRun
from llama.tokenizer import Tokenizer


@dataclass
class StreamEvent:
    """One new token of prompt `index` (token None on the closing event of a stop token or the
    sequence limit); `text` is the piece of answer it makes readable (may be ""). Concatenating a
    prompt's texts gives exactly the non-streaming answer."""

    index: int
    text: str
    token: Optional[int]
    logprob: Optional[float]
    finished: bool


class IncrementalDecoder:
    """Decode a growing token list piece by piece, in time linear in the answer.

    Decodes only the tokens since the last emitted piece plus the one before (so SentencePiece's
    leading-space rule and byte-split characters decode as in the whole), and holds text back
    while it ends in U+FFFD (an incomplete UTF-8 character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.prefix_offset = 0  # decoding starts here
        self.read_offset = 0  # text of tokens[prefix_offset:read_offset] is already emitted
        self.emitted = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text) or not text.startswith(prefix_text):
            return ""
        piece = text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.emitted += piece
        return piece

    def flush(self) -> str:
        """The rest of the text once no token follows (held-back U+FFFD included)."""
        full = self.tokenizer.decode(self.tokens)
        piece = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += piece
        return piece


def stream_events(run: DecodeRun, tokenizer: Tokenizer, refusals: List[Optional[str]]) -> Iterator[StreamEvent]:
    """Events for the answers of `run`, one per AnswerStep. A row with a refusal (Llama 2's
    UNSAFE_ERROR, see Llama._encode_dialogs) streams its tokens with no text and the refusal on
    its closing event. Stops once every answer has ended: what the run has left only scores prompts."""
    decoders = [IncrementalDecoder(tokenizer) for _ in refusals]
    open_answers = len(refusals)
    for step in run:
        for i, answer in step.items():
            text = decoders[i].push(answer.token) if answer.token is not None and refusals[i] is None else ""
            if answer.ended:
                text = refusals[i] if refusals[i] is not None else text + decoders[i].flush()
                open_answers -= 1
            yield StreamEvent(i, text, answer.token, answer.logprob, answer.ended)
        if open_answers == 0:
            return


def print_in_order(events: Iterator[StreamEvent], headers: List[str], footer: str, file=None) -> None:
    """Print each answer after its header, in index order: the earliest unfinished answer live,
    the others buffered until their turn (the batch still advances together)."""
    file = file or sys.stdout
    buffered = [""] * len(headers)
    finished = [False] * len(headers)
    live = 0

    def advance() -> int:
        nonlocal live
        while live < len(headers) and finished[live]:
            print(footer, file=file, flush=True)
            live += 1
            if live < len(headers):
                print(headers[live] + buffered[live], end="", file=file, flush=True)
        return live

    print(headers[0], end="", file=file, flush=True)
    for event in events:
        if event.index == live:
            print(event.text, end="", file=file, flush=True)
        else:
            buffered[event.index] += event.text
        finished[event.index] = event.finished
        advance()
