"""SADR: zero at step 0, hand-built mask and KL, vectorised == loop reference, gradient to z."""

import math

import pytest
import torch

from kelight.editors.locate.zopt import ZConfig, optimise_z
from kelight.editors.rewrite import build_rewrite_batch
from kelight.lm.forward import attention_implementation
from kelight.lm.hooks import add_at, edit_output
from kelight.objectives.base import StepState
from kelight.objectives.sadr import SADR, sadr_loss, sadr_terms
from kelight.types import EditInputError


def _rows(seed, shape=(3, 4, 5, 7)):  # (L, P, H, T) valid attention rows
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).softmax(-1)


def _loop_reference(vanilla, current, subject_pos, eps=1e-8):
    n_layers, n_prompts, n_heads, _ = vanilla.shape
    total = 0.0
    for b in range(n_prompts):
        s = int(subject_pos[b])
        for layer in range(n_layers):
            m = max(float(vanilla[layer, b, h, s]) for h in range(n_heads))
            for h in range(n_heads):
                if float(current[layer, b, h, s]) > m:
                    p, q = vanilla[layer, b, h].double(), current[layer, b, h].double()
                    total += float((p * ((p + eps) / (q + eps)).log()).sum())
    return total / n_prompts


def test_zero_when_current_equals_vanilla():
    v = _rows(0)
    loss, mask = sadr_loss(v, v.clone(), torch.tensor([1, 2, 3, 4]))
    assert loss.item() == 0.0 and not mask.any()


def test_zero_when_no_head_over_attends():
    v = _rows(1)
    s = torch.tensor([0, 1, 2, 3])
    cur = _rows(2)
    # push every current subject weight below the vanilla per-layer maximum
    cols = s.view(1, 4, 1, 1).expand(3, 4, 5, 1)
    cur = cur.scatter(-1, cols, 0.0)
    loss, mask = sadr_loss(v, cur, s)
    assert loss.item() == 0.0 and not mask.any()


def test_hand_built_case():
    # one layer, one prompt, two heads, three keys; subject = key 1
    vanilla = torch.tensor([[[[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]]])  # max over heads at s: 0.3
    current = torch.tensor([[[[0.2, 0.6, 0.2], [0.5, 0.25, 0.25]]]])  # head 0: 0.6 > 0.3 selected
    loss, mask = sadr_loss(vanilla, current, torch.tensor([1]))
    assert mask.tolist() == [[[True, False]]]
    expected = sum(p * math.log(p / q) for p, q in [(0.5, 0.2), (0.3, 0.6), (0.2, 0.2)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_all_heads_variant_restrains_every_head():
    vanilla = torch.tensor([[[[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]]])
    current = torch.tensor([[[[0.2, 0.6, 0.2], [0.5, 0.25, 0.25]]]])
    loss, mask = sadr_loss(vanilla, current, torch.tensor([1]), selective=False)
    assert mask.tolist() == [[[True, True]]]
    expected = sum(p * math.log(p / q) for p, q in [(0.5, 0.2), (0.3, 0.6), (0.2, 0.2)])
    expected += sum(p * math.log(p / q) for p, q in [(0.6, 0.5), (0.2, 0.25), (0.2, 0.25)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_vectorised_equals_loop():
    v, cur = _rows(3), _rows(4)
    s = torch.tensor([6, 0, 3, 2])
    loss, _ = sadr_loss(v, cur, s)
    assert loss.item() == pytest.approx(_loop_reference(v, cur, s), rel=1e-5)


def test_gradient_reaches_z_and_vanilla_recorded_at_step_zero():
    from kelight.models.tiny import tiny_model
    from kelight.types import EditRequest

    model, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome"), ["{}", "Hi. {}"],
                                "cpu")
    term = SADR(gamma=1.0, first_layer=1)
    seen = []

    def spy(state: StepState) -> torch.Tensor:
        value = term(state)
        seen.append((state.step, value))
        return value

    z = optimise_z(model, "model.layers.0.mlp.down_proj", batch, ZConfig(steps=3), (spy,), want_attn=True)
    assert seen[0][1].item() == 0.0  # step 0: current == vanilla
    assert term.vanilla.shape == (2, 2, 6, batch.input_ids.shape[1])  # layers 1..2, 2 prompts, 6 heads
    assert z.delta.norm() > 0
    assert model.config._attn_implementation == "sdpa"  # restored after the optimisation
    # a z that makes a head over-attend gives a positive loss whose gradient reaches z
    delta = (torch.randn(48, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    with edit_output(model, "model.layers.0.mlp.down_proj", add_at(batch.rows, batch.subject_pos, delta)), \
            attention_implementation(model, "eager"):
        out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    loss = term(StepState(step=1, batch=batch, outputs=out))
    assert loss.item() > 0 and term.selected[-1].sum() > 0
    loss.backward()
    assert delta.grad.abs().sum() > 0


def test_negative_gamma_rejected():
    with pytest.raises(ValueError, match="sadr_gamma"):
        SADR(-1.0, 1)


@pytest.mark.parametrize("gamma", [-0.5, float("nan"), float("inf"), "0.1", True])
def test_sadr_terms_refuse_a_bad_gamma_instead_of_turning_sadr_off(gamma):
    with pytest.raises(EditInputError, match=r"expected sadr_gamma to be a finite number ≥ 0, got .*; use 0 to turn "
                                             r"SADR off"):
        sadr_terms(gamma, 1)


def test_sadr_terms_off_at_zero_and_selective_must_be_a_bool():
    assert sadr_terms(0.0, 1) == () and sadr_terms(0, 1) == ()
    (term,) = sadr_terms(0.01, 2, selective=False)
    assert (term.gamma, term.first_layer, term.selective) == (0.01, 2, False)
    with pytest.raises(EditInputError, match="expected sadr_selective to be true or false, got 'false'"):
        sadr_terms(0.01, 1, selective="false")
