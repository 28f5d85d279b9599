"""PAC's path tracing on tiny models of every family: impact scores against a hand computation from
HF's own loss gradient, disjoint critical and negative paths, clear errors."""

import numpy as np
import pytest
import torch

from kelight.editors.pac.trace import impact_scores, select_paths, trace_paths
from kelight.editors.pathedit import build_path_batch
from kelight.editors.steps import EditOptimizationError
from kelight.lm.tokens import target_ids
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.types import EditInputError, EditRequest

REQUEST = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris")


def _hand_scores(grad_hf: np.ndarray) -> np.ndarray:
    """The reference's recipe in NumPy: z-score rows across neurons (ddof=1), |·|, mean over rows."""
    z = (grad_hf - grad_hf.mean(1, keepdims=True)) / grad_hf.std(1, ddof=1, keepdims=True)
    return np.abs(z).mean(0)


# stored layout -> (hidden, d_ff), written out per family rather than taken from the adapter
HAND_LAYOUT = {  # family: (mlp_in name, transpose mlp_in grad?, mlp_out name, transpose mlp_out grad?)
    "llama": ("mlp.up_proj", True, "mlp.down_proj", False),
    "gpt2": ("mlp.c_fc", False, "mlp.c_proj", True),  # Conv1D stores (in, out)
    "gptj": ("mlp.fc_in", True, "mlp.fc_out", False),
}


@pytest.mark.parametrize("family", sorted(HAND_LAYOUT))
def test_impact_scores_match_hand_computation(family):
    model, tok = tiny_model(family)
    request = REQUEST
    prompt_ids, tgt = target_ids(tok, request.prompt, request.target_new)
    ids = torch.tensor([prompt_ids + tgt])
    labels = torch.tensor([[-100] * len(prompt_ids) + tgt])
    model.requires_grad_(True)
    model(input_ids=ids, labels=labels).loss.backward()  # HF's own mean token cross-entropy
    model.requires_grad_(False)
    blocks = model.model.layers if family == "llama" else model.transformer.h
    in_name, in_t, out_name, out_t = HAND_LAYOUT[family]
    selection = trace_paths(model, adapter_for(model), [build_path_batch(tok, [request], "cpu")], 5, 1)
    for layer, block in enumerate(blocks):
        g_in = block.get_submodule(in_name).weight.grad.double().numpy()
        g_out = block.get_submodule(out_name).weight.grad.double().numpy()
        expect_key = _hand_scores(g_in.T if in_t else g_in)
        expect_value = _hand_scores(g_out.T if out_t else g_out)
        np.testing.assert_allclose(selection.key_scores[layer].numpy(), expect_key, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(selection.value_scores[layer].numpy(), expect_value, rtol=2e-4, atol=1e-6)
        assert set(selection.key_pos[layer].tolist()) == set(np.argsort(-expect_key)[:5].tolist())


def test_impact_scores_constant_row_counts_zero():
    grad = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # (H=2, F=3); the second row is constant
    expect = torch.tensor([1.0, 0.0, 1.0]) / 2  # row 1: z = (-1, 0, 1); row 2 contributes 0
    torch.testing.assert_close(impact_scores(grad), expect)


@pytest.mark.parametrize("scores", [
    torch.rand(4, 20, generator=torch.Generator().manual_seed(0)),
    torch.ones(4, 20),  # all tied: still disjoint
    torch.arange(20.0).repeat(4, 1),
])
@pytest.mark.parametrize(("size", "neg"), [(15, 1), (19, 1), (1, 19), (5, 0), (10, 10)])
def test_negative_path_never_overlaps_critical_path(scores, size, neg):
    pos, bottom = select_paths(scores, size, neg)
    assert pos.shape == (4, size) and bottom.shape == (4, neg)
    for layer in range(4):
        assert not set(pos[layer].tolist()) & set(bottom[layer].tolist())
        assert len(set(pos[layer].tolist())) == size
        s = scores[layer]
        if neg:
            assert s[pos[layer]].min() >= s[bottom[layer]].max()
            assert s[bottom[layer, 0]] == s.min()
        assert s[pos[layer, 0]] == s.max()


def test_select_paths_errors():
    with pytest.raises(EditInputError, match="exceeds the FFN width d_ff = 20"):
        select_paths(torch.rand(2, 20), 20, 1)
    with pytest.raises(EditOptimizationError, match="NaN/inf"):
        select_paths(torch.tensor([[1.0, float("nan"), 0.0]]), 1, 1)
