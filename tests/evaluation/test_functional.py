"""Functional metric math against NumPy references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kelight.evaluation import functional as F


def test_pairwise_scores_match_numpy() -> None:
    rng = np.random.default_rng(0)
    right, wrong = rng.gamma(2.0, 1.0, size=(2, 50))
    wrong[:5] = right[:5]  # ties count as failures
    success, magnitude = F.pairwise_scores(torch.tensor(right), torch.tensor(wrong))
    np.testing.assert_array_equal(success.numpy(), (np.exp(-wrong) < np.exp(-right)).astype(float))
    np.testing.assert_allclose(magnitude.numpy(), np.exp(-right), rtol=1e-12)
    assert success[:5].sum() == 0


def test_pairwise_update_is_sufficient_statistics() -> None:
    right, wrong = torch.tensor([0.1, 2.0, 0.5]), torch.tensor([1.0, 1.0, 0.2])
    n_success, magnitude, n = F.pairwise_update(right, wrong)
    assert (float(n_success), n) == (1.0, 3)
    assert math.isclose(float(magnitude), math.exp(-0.1) + math.exp(-2.0) + math.exp(-0.5), rel_tol=1e-6)


def test_pairwise_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        F.pairwise_scores(torch.zeros(3), torch.zeros(2))


def test_harmonic_mean() -> None:
    assert math.isclose(F.harmonic_mean([1.0, 2.0, 4.0]), 3 / (1 + 1 / 2 + 1 / 4))
    assert F.harmonic_mean([50.0, 0.0, 90.0]) == 0.0
    assert F.harmonic_mean([42.0]) == 42.0
    with pytest.raises(ValueError, match="at least one value"):
        F.harmonic_mean([])
    with pytest.raises(ValueError, match="non-negative"):
        F.harmonic_mean([1.0, -1.0])


def _h(*probs: float) -> float:
    return -sum(p * math.log2(p) for p in probs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bigrams ab, ba, ab -> (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2)
        ("a b a b", (2 / 3 * _h(2 / 3, 1 / 3) + 4 / 3 * _h(0.5, 0.5)) / 2),
        # two distinct bigrams, one trigram (H = 0)
        ("the cat sat", (2 / 3 * 1.0 + 0.0) / 2),
        # words: the cat . the cat . -> bigrams (the cat)x2 (cat .)x2 (. the); trigrams 2,1,1
        ("the cat. the cat.", (2 / 3 * _h(0.4, 0.4, 0.2) + 4 / 3 * _h(0.5, 0.25, 0.25)) / 2),
        ("word", 0.0),  # no n-grams at all: the reference gives 0
        ("", 0.0),
    ],
)
def test_ngram_entropy_hand_values(text: str, expected: float) -> None:
    assert math.isclose(F.ngram_entropy(text), expected, abs_tol=1e-12)


def test_n_gram_entropy_is_mean_over_texts() -> None:
    texts = ["a b a b", "the cat sat", "one two three four five"]
    expected = np.mean([F.ngram_entropy(t) for t in texts])
    assert math.isclose(F.n_gram_entropy(texts), expected)
    # five distinct words: 4 bigrams and 3 trigrams, all distinct
    assert math.isclose(F.ngram_entropy(texts[2]), (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    with pytest.raises(ValueError, match="at least one generated text"):
        F.n_gram_entropy([])


def test_words_regex_splits_punctuation() -> None:
    assert F.words("Paris, France's capital.") == ["Paris", ",", "France", "'", "s", "capital", "."]


def test_perplexity() -> None:
    assert math.isclose(F.perplexity(10.0, 5), math.exp(2.0))
    assert math.isnan(F.perplexity(0.0, 0))
    with pytest.raises(ValueError, match="token count"):
        F.perplexity(1.0, -1)


def test_perplexity_of_a_collapsed_model_is_infinite_not_an_error() -> None:
    # mean NLL above ~709 nats overflows math.exp; a destroyed model must still get a report
    assert F.perplexity(800.0 * 10, 10) == math.inf


def test_token_accuracy_and_locality() -> None:
    assert math.isclose(float(F.token_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))), 2 / 3)
    preds, targets = [torch.tensor([1, 2]), torch.tensor([5])], [torch.tensor([1, 2]), torch.tensor([4])]
    acc = F.token_accuracies(preds, targets)
    np.testing.assert_allclose(acc.numpy(), [1.0, 0.0])
    assert F.token_accuracies([], []).numel() == 0


def test_token_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="same non-empty shape"):
        F.token_accuracy(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="same non-empty shape"):
        F.token_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="as many predictions as targets"):
        F.token_accuracies([torch.tensor([1])], [])
