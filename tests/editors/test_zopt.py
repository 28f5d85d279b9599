"""z optimisation: replaying the blocks below the edit gives the same result as recomputing them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kelight.editors.context import build_rewrite_batch
from kelight.editors.zopt import ZConfig, optimise_z
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR
from kelight.types import EditRequest

REQUEST = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]


def _run(model, tok, reuse: bool, layer: int, gamma: float = 0.0):
    cfg = ZConfig(steps=6, lr=0.5, early_stop_loss=0.0, reuse_prefix=reuse)
    adapter = adapter_for(model)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    terms = (SADR(gamma, layer + 1),) if gamma else ()
    return optimise_z(model, adapter.path("mlp_out", layer), batch, cfg, terms, want_attn=bool(terms),
                      first_edited_block=layer), terms


def _count_calls(model) -> dict[str, int]:
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    model.get_submodule(adapter_for(model).block_path(0)).register_forward_hook(hook)
    return calls


def test_prefix_replay_matches_recomputation(tiny):
    model, tok = tiny
    calls = _count_calls(model)
    fresh, _ = _run(model, tok, reuse=False, layer=1)
    assert calls["n"] == 6  # block 0 recomputed at every step
    calls["n"] = 0
    replayed, _ = _run(model, tok, reuse=True, layer=1)
    assert calls["n"] == 1  # computed at step 0, replayed after
    torch.testing.assert_close(replayed.delta, fresh.delta, rtol=1e-5, atol=1e-6)
    assert replayed.losses == pytest.approx(fresh.losses, rel=1e-5, abs=1e-6)


def test_prefix_replay_keeps_sadr_on_the_right_layers():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    fresh, (sadr_fresh,) = _run(model, tok, reuse=False, layer=1, gamma=5.0)
    replayed, (sadr_replayed,) = _run(model, tok, reuse=True, layer=1, gamma=5.0)
    assert replayed.losses == pytest.approx(fresh.losses, rel=1e-5, abs=1e-6)
    assert [m.tolist() for m in sadr_replayed.selected] == [m.tolist() for m in sadr_fresh.selected]
    assert sadr_replayed.selected[0].shape[0] == 1  # 3 layers, edit at 1: only layer 2 can drift


def test_blocks_are_restored_after_replay(tiny):
    model, tok = tiny
    layers = model.get_submodule(adapter_for(model).layers)
    before = list(layers)
    _run(model, tok, reuse=True, layer=2)
    assert all(a is b for a, b in zip(layers, before, strict=True))


def test_blocks_are_restored_when_the_optimisation_fails(monkeypatch):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    layers = model.get_submodule(adapter_for(model).layers)
    before = list(layers)
    calls = {"n": 0}

    def boom(state):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 2 else torch.tensor(0.0)

    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    with pytest.raises(FloatingPointError, match="diverged at step 1"):
        optimise_z(model, adapter_for(model).path("mlp_out", 2), batch,
                   dataclasses.replace(ZConfig(), early_stop_loss=0.0), (boom,), first_edited_block=2)
    assert all(a is b for a, b in zip(layers, before, strict=True))
