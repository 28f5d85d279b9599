"""z optimisation: replaying the blocks below the edit gives the same result as recomputing them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kelight.editors.locate.zopt import ZConfig, optimise_z
from kelight.editors.rewrite import build_rewrite_batch
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR
from kelight.types import EditRequest

REQUEST = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]


def _run(model, tok, reuse: bool, layer: int, gamma: float = 0.0, cache_prefix: bool = True, rows: bool = True):
    cfg = ZConfig(steps=6, lr=0.5, early_stop_loss=0.0, reuse_prefix=reuse, cache_prefix=cache_prefix,
                  attention_rows=rows)
    adapter = adapter_for(model)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    terms = (SADR(gamma, layer + 1),) if gamma else ()
    return optimise_z(model, adapter.path("mlp_out", layer), batch, cfg, terms, want_attn=bool(terms),
                      first_edited_block=layer), terms


def _record_widths(model) -> list[int]:
    """Sequence length of every forward through the last block."""
    widths: list[int] = []
    last = adapter_for(model).block_path(adapter_for(model).n_layers(model) - 1)
    model.get_submodule(last).register_forward_hook(lambda m, args, out: widths.append(
        (out[0] if isinstance(out, tuple) else out).shape[1]))
    return widths


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
    assert calls["n"] == 1 + 6  # the prefixes' KV cache once, then block 0 recomputed at every step
    calls["n"] = 0
    replayed, _ = _run(model, tok, reuse=True, layer=1)
    assert calls["n"] == 1 + 1  # the prefixes once; the suffixes at step 0, replayed after
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
    _run(model, tok, reuse=True, layer=1)  # block 0 replayed
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
        optimise_z(model, adapter_for(model).path("mlp_out", 1), batch,
                   dataclasses.replace(ZConfig(), early_stop_loss=0.0), (boom,), first_edited_block=1)
    assert all(a is b for a, b in zip(layers, before, strict=True))


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_cached_prefix_matches_full_prompts(tiny, gamma):
    """Steps over the tokens from the subject on, on a KV cache of the rest, equal full-prompt steps."""
    model, tok = tiny
    widths = _record_widths(model)
    full, full_terms = _run(model, tok, reuse=True, layer=1, gamma=gamma, cache_prefix=False)
    full_widths, widths[:] = list(widths), []
    cached, cached_terms = _run(model, tok, reuse=True, layer=1, gamma=gamma, cache_prefix=True)
    # steps of the cached run see only the tokens from the subject on (after the one prefix forward),
    # unless a sliding window (tiny Gemma-3: 8) is shorter than the prefixes: full prompts then
    window = getattr(model.config, "sliding_window", None)
    prefix = int(build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu").subject_pos.max())
    assert len(set(full_widths)) == 1
    assert (max(widths[1:]) < full_widths[0]) == (window is None or window > prefix)
    torch.testing.assert_close(cached.v_init, full.v_init, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.delta, full.delta, rtol=1e-4, atol=1e-5)
    assert cached.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    if gamma:  # same heads selected at every step, same vanilla rows on the real keys
        assert [m.tolist() for m in cached_terms[0].selected] == [m.tolist() for m in full_terms[0].selected]


@pytest.mark.parametrize("window", [8, 64])
def test_cached_prefix_with_sliding_window(window):
    """Gemma-3's sliding layers: a window longer than the prefixes keeps them all (cached steps);
    a shorter one drops keys, and the steps fall back to full prompts. Both equal full prompts."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("gemma3_text", sliding_window=window)
    full, _ = _run(model, tok, reuse=True, layer=0, gamma=5.0, cache_prefix=False)
    calls, widths = _count_calls(model), _record_widths(model)
    cached, _ = _run(model, tok, reuse=False, layer=0, gamma=5.0, cache_prefix=True)
    assert calls["n"] == 1 + 6  # the prefix forward runs either way
    n_tokens = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu").input_ids.shape[1]
    assert (widths[-1] < n_tokens) == (window == 64)  # cached steps only where the window keeps the prefix
    cached_replayed, _ = _run(model, tok, reuse=True, layer=0, gamma=5.0, cache_prefix=True)
    for result in (cached, cached_replayed):
        assert result.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(result.delta, full.delta, rtol=1e-4, atol=1e-5)


def test_cached_prefix_matches_with_eager_attention_rows():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    full, _ = _run(model, tok, reuse=True, layer=0, gamma=5.0, cache_prefix=False, rows=False)
    cached, _ = _run(model, tok, reuse=True, layer=0, gamma=5.0, cache_prefix=True, rows=False)
    assert cached.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_an_unreachable_value_vector_is_an_input_error():
    """The last layer's MLP output at the subject feeds no later position: z would never move."""
    from kelight.models.tiny import tiny_model
    from kelight.types import EditInputError

    model, tok = tiny_model("llama")
    with pytest.raises(EditInputError, match=r"model\.layers\.2\.mlp\.down_proj gets no gradient"):
        _run(model, tok, reuse=True, layer=2)
    result, _ = _run(model, tok, reuse=True, layer=1)
    assert result.delta.norm() > 0


def _with_constant(value: float):
    """An extra term worth ``value`` per request at every step: it moves no gradient, only the loss."""

    def term(state) -> torch.Tensor:
        return torch.full((state.batch.n_requests,), value)

    return term


def _stop_threshold(losses: list[float], first: int, last: int) -> tuple[float, int]:
    """A threshold between two of ``losses`` at which a run would stop at a step ``k`` in ``[first, last]``
    (the first step whose loss is below it), and that ``k``."""
    values = sorted(set(losses))
    stop_at = {t: next(i + 1 for i, v in enumerate(losses) if v < t) for t in
               ((a + b) / 2 for a, b in zip(values, values[1:], strict=False))}
    return next((t, k) for t, k in stop_at.items() if first <= k <= last)


def test_early_stop_on_edit_ignores_extra_terms():
    """A constant extra term above the threshold keeps 'total' from ever stopping; 'edit' stops
    exactly where the run without the term does, with the same δ (a constant has no gradient)."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    path = adapter_for(model).path("mlp_out", 1)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    free = ZConfig(steps=12, lr=0.5, weight_decay=0.0, early_stop_loss=0.0)
    losses = optimise_z(model, path, batch, free, first_edited_block=1).losses
    threshold, stop = _stop_threshold(losses, 2, 11)  # stops after some updates
    plain = optimise_z(model, path, batch, dataclasses.replace(free, early_stop_loss=threshold), first_edited_block=1)
    assert plain.steps_run == stop
    for on, steps in (("total", 12), ("edit", stop)):
        cfg = dataclasses.replace(free, early_stop_loss=threshold, early_stop_on=on)
        z = optimise_z(model, path, batch, cfg, (_with_constant(1.0),), first_edited_block=1)
        assert z.steps_run == steps
        assert z.losses[:stop] == pytest.approx([v + 1.0 for v in plain.losses], rel=1e-6)  # losses keep the term
        if on == "edit":
            torch.testing.assert_close(z.delta, plain.delta, rtol=0, atol=0)


def test_early_stop_on_is_the_same_without_extra_terms(tiny):
    model, tok = tiny
    path = adapter_for(model).path("mlp_out", 1)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    free = optimise_z(model, path, batch, ZConfig(steps=10, early_stop_loss=0.0), first_edited_block=1).losses
    threshold, stop = _stop_threshold(free, 1, 9)  # a threshold the run crosses before its last step
    total, edit = (optimise_z(model, path, batch, ZConfig(steps=10, early_stop_loss=threshold, early_stop_on=on),
                              first_edited_block=1) for on in ("total", "edit"))
    assert total.steps_run == edit.steps_run == stop and total.losses == edit.losses
    torch.testing.assert_close(total.delta, edit.delta, rtol=0, atol=0)


def test_early_stop_on_must_be_total_or_edit():
    with pytest.raises(ValueError, match="early_stop_on to be 'total' .* or 'edit' .*got 'rewrite'"):
        ZConfig(early_stop_on="rewrite")


def _run_relations(model, tok, factor: float, gamma: float = 0.0, cache_prefix: bool = True, layer: int = 1):
    cfg = ZConfig(steps=5, early_stop_loss=0.0, relation_kl_factor=factor, relation_prompts=3,
                  cache_prefix=cache_prefix, weight_decay=0.0, clamp_norm_factor=1e3)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    terms = (SADR(gamma, layer + 1),) if gamma else ()
    return optimise_z(model, adapter_for(model).path("mlp_out", layer), batch, cfg, terms, want_attn=bool(terms),
                      first_edited_block=layer), terms


@pytest.mark.parametrize("gamma", [0.0, 50.0])
def test_relation_term_gives_the_same_loss_with_and_without_the_prefix_cache(tiny, gamma):
    """The relation rows are cut at their subject and run on the cache like the rest; SADR with them."""
    model, tok = tiny
    full, full_terms = _run_relations(model, tok, 20.0, gamma, cache_prefix=False)
    cached, cached_terms = _run_relations(model, tok, 20.0, gamma, cache_prefix=True)
    assert cached.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(cached.delta, full.delta, rtol=1e-4, atol=1e-5)
    plain, _ = _run_relations(model, tok, 0.0, gamma)
    assert abs(plain.losses[-1] - cached.losses[-1]) > 1e-5  # the term is live (above float noise)
    if gamma:  # SADR reads the rewriting rows only: one mask column per rewriting prompt
        assert [m.tolist() for m in cached_terms[0].selected] == [m.tolist() for m in full_terms[0].selected]
        assert cached_terms[0].vanilla.shape[1] == len(TEMPLATES)


def test_relation_rows_leave_sadr_its_rewriting_rows():
    """With the relation rows after the essence row, SADR's vanilla rows and head masks are those of the
    rewriting prompts: the same as without relation rows at step 0."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    seen = []

    class Spy(SADR):
        def __call__(self, state):
            value = super().__call__(state)
            seen.append((state.batch.n_relation, self.vanilla.clone(), self.selected[-1].clone()))
            return value

    path = adapter_for(model).path("mlp_out", 0)
    batch = build_rewrite_batch(tok, REQUEST, TEMPLATES, "cpu")
    for factor in (0.0, 1.0):
        cfg = ZConfig(steps=1, early_stop_loss=0.0, relation_kl_factor=factor, relation_prompts=4)
        optimise_z(model, path, batch, cfg, (Spy(5.0, 1),), want_attn=True)
    (n0, vanilla0, mask0), (n1, vanilla1, mask1) = seen
    assert (n0, n1) == (0, 4)
    assert vanilla1.shape[1] == len(TEMPLATES) and vanilla1.shape[:3] == vanilla0.shape[:3]
    width = min(vanilla0.shape[-1], vanilla1.shape[-1])  # keys: padded to the batch's widest row
    torch.testing.assert_close(vanilla1[..., :width], vanilla0[..., :width], rtol=1e-5, atol=1e-6)
    assert torch.equal(mask1, mask0)
