"""Top-p sampling without sorting the vocabulary draws what Meta's sample_top_p draws, token for
token, and leaves the random generator where it leaves it."""

import pytest
import torch

from llama import sample_top_p
from llama.decoding import loop
from llama.decoding.loop import _sample_top_p


def draws_equal(probs: torch.Tensor, p: float, seed: int) -> bool:
    torch.manual_seed(seed)
    want, want_state = sample_top_p(probs.clone(), p), torch.get_rng_state()
    torch.manual_seed(seed)
    got, got_state = _sample_top_p(probs.clone(), p), torch.get_rng_state()
    return torch.equal(got, want) and torch.equal(got_state, want_state)


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_draws_equal_sample_top_p_on_peaked_and_flat_distributions(vocab):
    g = torch.Generator().manual_seed(vocab)
    for sharpness in (0.3, 1.0, 3.0, 8.0):  # nuclei of thousands of tokens down to one
        probs = torch.softmax(torch.randn(3, vocab, generator=g) * sharpness, dim=-1)
        for p in (0.5, 0.9, 0.95):
            assert all(draws_equal(probs, p, seed) for seed in range(3)), (sharpness, p)


def test_draws_equal_sample_top_p_with_equal_probabilities_in_the_nucleus():
    logits = torch.randn(2, 49152, generator=torch.Generator().manual_seed(0))
    logits[:, 100:110] = 12.0  # ten tokens of one probability, most of the mass
    logits[1, 7] = 12.0 + 1e-3
    probs = torch.softmax(logits, dim=-1)
    assert all(draws_equal(probs, 0.9, seed) for seed in range(20))


def test_draws_equal_sample_top_p_when_p_keeps_everything():
    probs = torch.softmax(torch.randn(1, 5000, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert all(draws_equal(probs, p, seed) for p in (1.0, 0.999999) for seed in range(3))


def test_a_small_vocabulary_draws_as_sample_top_p():
    probs = torch.softmax(torch.randn(4, 100, generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    assert all(draws_equal(probs, 0.8, seed) for seed in range(10))


def test_a_typical_nucleus_is_drawn_without_sorting_the_vocabulary(monkeypatch):
    probs = torch.softmax(torch.randn(2, 49152, generator=torch.Generator().manual_seed(3)) * 4, dim=-1)
    monkeypatch.setattr(loop, "sample_top_p", lambda *args: pytest.fail("sorted the whole vocabulary"))
    assert _sample_top_p(probs, 0.9).shape == (2, 1)
