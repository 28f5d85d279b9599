"""Contrastive rectification: λ·CE towards the unedited argmax, against torch's cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from kelight.objectives.contrastive import contrastive_loss, unedited_targets


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=gen)  # (N, V): prompt 0 has 2 target tokens, prompt 1 has 3
    return logits.log_softmax(-1), torch.tensor([0, 0, 1, 1, 1])


def test_unedited_targets_is_detached_argmax():
    log_probs, _ = _inputs()
    log_probs.requires_grad_(True)
    ref = unedited_targets(log_probs)
    assert torch.equal(ref, log_probs.argmax(-1)) and not ref.requires_grad


def test_matches_cross_entropy_per_prompt():
    log_probs, rows = _inputs()
    ref = torch.tensor([3, 1, 4, 1, 5])
    per_prompt = [F.cross_entropy(log_probs[:2], ref[:2]), F.cross_entropy(log_probs[2:], ref[2:])]
    expect = 0.5 * (per_prompt[0] + per_prompt[1]) / 2  # λ · mean over prompts of the token-mean CE
    torch.testing.assert_close(contrastive_loss(log_probs, ref, rows, 2, weight=0.5), expect)


def test_unedited_predictions_are_the_minimum_direction():
    """At the unedited model's own argmax the loss is below that of any other token choice."""
    log_probs, rows = _inputs()
    best = contrastive_loss(log_probs, unedited_targets(log_probs), rows, 2, weight=1.0)
    other = contrastive_loss(log_probs, (unedited_targets(log_probs) + 1) % 11, rows, 2, weight=1.0)
    assert best < other
    assert contrastive_loss(log_probs, unedited_targets(log_probs), rows, 2, weight=0.0) == 0


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_bad_weight(weight):
    log_probs, rows = _inputs()
    with pytest.raises(ValueError, match="contrastive_lambda to be a finite number ≥ 0"):
        contrastive_loss(log_probs, unedited_targets(log_probs), rows, 2, weight)


def test_reference_shape_mismatch():
    log_probs, rows = _inputs()
    with pytest.raises(ValueError, match="one reference token per target position"):
        contrastive_loss(log_probs, torch.tensor([1, 2]), rows, 2, 1.0)
