"""PathEdit on tiny models of every family: sparse deltas that equal dense weights and cannot touch
masked weights (momentum included), each term on its own path, exact restore, clear errors (tracing:
test_path_trace.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kelight.editors import pathedit
from kelight.editors.pac.deltas import PathDeltas, PathSelection, layer_weights
from kelight.editors.pac.trace import path_nll, select_paths, trace_paths
from kelight.editors.pathedit import PathEditor, PathHParams, build_path_batch
from kelight.editors.undo import UndoLog
from kelight.lm.forward import final_hidden
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError, EditRequest
from tests.editors.eager import assert_rows_equal_eager

REQS = [EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris"),
        EditRequest("Mount Fuji is in", "Mount Fuji", "Peru", "Japan")]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, snap):
    return [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_hooks_equal_dense_weights(tiny, power):
    """The hook form of the deltas computes what the folded weights compute (Conv1D orientation),
    with and without the layer-aware weighting of T+."""
    model, tok = tiny
    adapter = adapter_for(model)
    editor = PathEditor(PathHParams(path_size=3, neg_path_size=2, layer_weighting=power))
    editor.setup(model, tok)
    batch = build_path_batch(tok, REQS, "cpu")
    editor.deltas.select(trace_paths(model, adapter, [batch], 3, 2), power)
    with torch.no_grad():
        for p in editor.deltas.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), editor.deltas.attached(model, adapter):
        hooked = final_hidden(model, batch.input_ids, batch.attention_mask)
    undo = UndoLog()
    editor.deltas.fold_into(model, adapter, (undo,))
    with torch.no_grad():
        dense = final_hidden(model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(hooked, dense, rtol=1e-4, atol=1e-5)
    assert all(not p.any() for p in editor.deltas.parameters())  # folded deltas are zeroed
    undo.restore()


def _spy_retrace(editor, model):
    """Record every selection and the weights right after its fold."""
    selections, snapshots = [], []
    original = editor.retrace

    def retrace(*args, **kwargs):
        selection = original(*args, **kwargs)
        selections.append(selection)
        snapshots.append(_snapshot(model))
        return selection

    editor.retrace = retrace
    return selections, snapshots


def _masked_indices(selections, kind, layer):
    return set().union(*(set(getattr(s, f"{kind}_pos")[layer].tolist()) | set(getattr(s, f"{kind}_neg")[layer].tolist())
                         for s in selections))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_weights_bit_identical_momentum_included(family):
    """Off-path weights never move; neurons that leave the path keep their folded value exactly."""
    model, tok = tiny_model(family)
    snap = _snapshot(model)
    editor = PathEditor(PathHParams(path_size=4, neg_path_size=1, eta=2, lr=5e-2, epochs=6))
    editor.setup(model, tok)
    selections, snapshots = _spy_retrace(editor, model)
    undo = UndoLog()
    editor.apply(model, tok, REQS, undo)
    adapter = adapter_for(model)
    assert len(selections) == 3
    left_path = 0
    for layer in range(adapter.n_layers(model)):
        for kind, which, dim in (("key", "mlp_in", 0), ("value", "mlp_out", 1)):
            name = f"{adapter.path(which, layer)}.weight"
            final = adapter.as_linear(model.state_dict()[name])
            for j, snapshot in enumerate([snap, *snapshots[1:]]):  # weights after the fold of tracing j
                keep = sorted(set(range(final.shape[dim])) - _masked_indices(selections[j:], kind, layer))
                before = adapter.as_linear(snapshot[name])
                assert torch.equal(final.index_select(dim, torch.tensor(keep)),
                                   before.index_select(dim, torch.tensor(keep))), (name, j)
            first, later = _masked_indices(selections[:1], kind, layer), _masked_indices(selections[1:], kind, layer)
            left_path += len(first - later)
    assert left_path > 0, "the paths must change between tracings for the momentum check to bite"
    ffn = {f"{adapter.path(w, layer)}.weight" for layer in range(3) for w in ("mlp_in", "mlp_out")}
    assert set(_changed(model, snap)) == ffn  # gate, attention, norms, embeddings, biases untouched
    undo.restore()
    assert _changed(model, snap) == []


def test_retrace_resets_adam_state():
    model, tok = tiny_model("llama")
    editor = PathEditor(PathHParams(path_size=4, lr=1e-2))
    editor.setup(model, tok)
    batch = build_path_batch(tok, REQS, "cpu")
    opt = torch.optim.Adam(editor.deltas.parameters(), lr=1e-2)
    editor.retrace(model, [batch], (UndoLog(),), opt)
    with editor.deltas.attached(model, editor.adapter):
        editor.loss(model, batch, editor.reference_ids(model, batch), (), step=0).backward()
    opt.step()
    assert len(opt.state) == 4
    editor.retrace(model, [batch], (UndoLog(),), opt)
    assert len(opt.state) == 0 and all(not p.any() for p in editor.deltas.parameters())


def test_each_term_reaches_only_its_path():
    model, tok = tiny_model("llama")
    editor = PathEditor(PathHParams(path_size=4, contrastive_lambda=1.0))
    editor.setup(model, tok)
    batch = build_path_batch(tok, REQS, "cpu")
    editor.retrace(model, [batch], (UndoLog(),))
    reference = editor.reference_ids(model, batch)
    grads = {}
    for lam in (0.0, 1.0):
        editor.hp = PathHParams(path_size=4, contrastive_lambda=lam)
        with editor.deltas.attached(model, editor.adapter):
            loss = editor.loss(model, batch, reference, (), step=0)
        grads[lam] = torch.autograd.grad(loss, list(editor.deltas.parameters()), allow_unused=True)
    names = [n for n, _ in editor.deltas.named_parameters()]
    for name, g0, g1 in zip(names, grads[0.0], grads[1.0], strict=True):
        if name.endswith("_pos"):  # the contrastive term does not reach T+
            torch.testing.assert_close(g0, g1, rtol=0, atol=0)
        else:  # τ− gets nothing from the NLL, something from the contrastive term
            assert g0 is None or not g0.any()
            assert g1 is not None and g1.any()


def test_restore_is_bit_exact_and_hooks_are_gone(tiny):
    model, tok = tiny
    snap = _snapshot(model)
    editor = PathEditor(PathHParams(path_size=4, lr=1e-2, epochs=3))
    editor.setup(model, tok)
    undo = UndoLog()
    before = path_nll(model, build_path_batch(tok, REQS, "cpu")).item()
    info = editor.apply(model, tok, REQS, undo)
    after = path_nll(model, build_path_batch(tok, REQS, "cpu")).item()
    assert after < before and info.steps == (3, 3) and len(editor.traces) == 1
    assert all(len(losses) == 3 for losses in info.losses)
    change = torch.stack([(v - snap[k]).square().sum() for k, v in model.state_dict().items()]).sum().sqrt()
    assert change > 0  # the logged norm is the weights' whole change (not the folded, zeroed deltas')
    torch.testing.assert_close(undo.change_norm(), change, rtol=1e-5, atol=0)
    assert all(not m._forward_hooks for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    undo.restore()
    assert _changed(model, snap) == []


def test_sadr_composes():
    model, tok = tiny_model("llama")
    sadr = SADR(gamma=1.0, first_layer=1)
    editor = PathEditor(PathHParams(path_size=4, lr=1e-2, epochs=3), (sadr,))
    editor.setup(model, tok)
    attn_before = model.config._attn_implementation
    undo = UndoLog()
    editor.apply(model, tok, REQS, undo)
    assert sadr.vanilla is not None and sadr.vanilla.shape[:2] == (2, 2)  # (L' = layers 1..2, P = 2 prompts)
    assert len(sadr.selected) == 3  # one head selection per step
    assert model.config._attn_implementation == attn_before
    undo.restore()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_sadr_on_attention_rows_equals_sadr_on_eager_attention(family, monkeypatch):
    def edit(model, tok, sadr):
        editor = PathEditor(PathHParams(path_size=4, lr=5e-2, epochs=4, eta=2), (sadr,))
        editor.setup(model, tok)
        return list(editor.apply(model, tok, REQS, UndoLog()).losses[0])

    assert_rows_equal_eager(monkeypatch, pathedit, family, edit)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"path_size": 0}, "path_size to be an integer ≥ 1"),
    ({"neg_path_size": -1}, "neg_path_size"),
    ({"eta": 0}, "eta"),
    ({"epochs": 1.5}, "epochs"),
    ({"lr": 0.0}, "lr to be a finite number > 0"),
    ({"contrastive_lambda": float("nan")}, "contrastive_lambda"),
    ({"layer_weighting": -1.0}, "layer_weighting to be a finite number ≥ 0"),
])
def test_bad_hparams(kwargs, match):
    with pytest.raises(EditInputError, match=match):
        PathHParams(**kwargs)


def test_setup_errors_name_the_fix():
    model, tok = tiny_model("llama")
    with pytest.raises(EditInputError, match="exceeds the FFN width d_ff = 96 of this llama model"):
        PathEditor(PathHParams(path_size=96, neg_path_size=1)).setup(model, tok)
    fake = nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="bert")
    with pytest.raises(ValueError, match="unknown architecture 'bert'"):
        PathEditor().setup(fake, tok)
    with pytest.raises(RuntimeError, match=r"call PathEditor\.setup\(model, tokenizer\) before computing edits"):
        PathEditor().apply(model, tok, REQS, UndoLog())


def test_conflicting_or_missing_requests_refused_before_any_weight_moves():
    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    editor = PathEditor(PathHParams(path_size=4, epochs=1))
    editor.setup(model, tok)
    berlin = EditRequest(REQS[0].prompt, REQS[0].subject, "Berlin")
    with pytest.raises(EditInputError, match=r"requests 0 and 2 .* subject 'Eiffel Tower' to different targets "
                                             r"\('Rome', 'Berlin'\); edit them in turn"):
        editor.apply(model, tok, [*REQS, berlin], UndoLog())
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        editor.apply(model, tok, [], UndoLog())
    assert _changed(model, snap) == []
    assert build_path_batch(tok, [REQS[0], REQS[0]], "cpu").n_rewrite == 2  # identical duplicates pass


def test_divergence_leaves_weights_unchanged():
    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    editor = PathEditor(PathHParams(path_size=4, lr=1e30, epochs=4, eta=1))
    editor.setup(model, tok)
    undo = UndoLog()
    with pytest.raises(FloatingPointError, match="diverged|NaN/inf"):
        editor.apply(model, tok, REQS, undo)
    assert _changed(model, snap) == []
    assert all(not m._forward_hooks for m in model.modules())


def test_path_selection_ranked():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    pos, neg = select_paths(scores, 2, 1)
    selection = PathSelection(pos, neg, pos, neg, scores, scores)
    torch.testing.assert_close(selection.ranked("key"), torch.tensor([[0.9, 0.5]]))
    deltas = PathDeltas(1, 3, 2, 1, "cpu")
    deltas.select(selection)
    idx, delta = deltas.delta("value", 0)
    assert idx.tolist() == [1, 2, 0] and delta.shape == (3, 3)


def test_layer_weights_match_hand_computation():
    ranked = torch.tensor([[3.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # layer means 2, 1, 0
    torch.testing.assert_close(layer_weights(ranked, 0.0), torch.ones(3))
    torch.testing.assert_close(layer_weights(ranked, 1.0), torch.tensor([2.0, 1.0, 0.0]))  # mean 1
    torch.testing.assert_close(layer_weights(ranked, 2.0), torch.tensor([4.0, 1.0, 0.0]) * 3 / 5)
    torch.testing.assert_close(layer_weights(torch.zeros(2, 3), 1.0), torch.ones(2))  # nothing to rank by


def test_layer_weighting_scales_each_layers_critical_path_only(tiny):
    """``delta`` (what the hooks add and the fold writes) is w_l·Δ on T+ and Δ on τ−."""
    model, tok = tiny
    adapter = adapter_for(model)
    selection = trace_paths(model, adapter, [build_path_batch(tok, REQS, "cpu")], 3, 1)
    deltas = PathDeltas(adapter.n_layers(model), model.config.hidden_size, 3, 1, "cpu")
    deltas.select(selection, 1.0)
    with torch.no_grad():
        for p in deltas.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    for kind in ("key", "value"):
        w = layer_weights(selection.ranked(kind), 1.0)
        assert not torch.equal(w, torch.ones_like(w))  # the traced scores do differ across layers
        for layer in range(adapter.n_layers(model)):
            _, delta = deltas.delta(kind, layer)
            pos, neg = getattr(deltas, f"{kind}_pos")[layer], getattr(deltas, f"{kind}_neg")[layer]
            torch.testing.assert_close(delta, torch.cat([pos * w[layer], neg]), rtol=0, atol=0)


def test_failed_apply_leaves_no_stale_deltas_for_the_next_edit():
    """A failure after some steps must not leave that edit's trained deltas in the editor: the next
    ``apply`` (consecutive regime, reused editor) would fold them into the weights at its first tracing."""
    def fail_at_step_2(state):
        if state.step == 2:
            raise RuntimeError("boom at step 2")
        return state.outputs.last_hidden_state.new_zeros(1)

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    hp = PathHParams(path_size=4, lr=1e-2, epochs=3, eta=4)
    editor = PathEditor(hp, (fail_at_step_2,))
    editor.setup(model, tok)
    with pytest.raises(RuntimeError, match="boom"):
        editor.apply(model, tok, REQS[:1], UndoLog())
    assert _changed(model, snap) == []
    editor.extra_losses = ()
    editor.apply(model, tok, REQS[1:], UndoLog())  # the same editor edits the next request
    reused = _snapshot(model)
    fresh_model, _ = tiny_model("llama")
    fresh = PathEditor(hp)
    fresh.setup(fresh_model, tok)
    fresh.apply(fresh_model, tok, REQS[1:], UndoLog())
    assert _changed(fresh_model, reused) == []  # as if the failed edit had never been tried


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_contrastive_targets_are_the_unedited_argmax_at_the_target_positions(family):
    """Teacher-forced on ``prompt + target``, the position before each target token, in a padded batch of
    requests whose prompts and targets differ in length (checked against HF's own logits, row by row)."""
    from kelight.lm.tokens import target_ids

    model, tok = tiny_model(family)
    requests = [EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome and the capital city", "Paris"), REQS[1]]
    editor = PathEditor(PathHParams(path_size=2))
    editor.setup(model, tok)
    expect = []
    for r in requests:
        prompt, target = target_ids(tok, r.prompt, r.target_new)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0]  # (T, V)
        expect += logits[len(prompt) - 1 : len(prompt) - 1 + len(target)].argmax(-1).tolist()
    assert editor.reference_ids(model, build_path_batch(tok, requests, "cpu")).tolist() == expect


@pytest.mark.parametrize(("dtype", "warned"), [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_half_precision_weights_warn_that_folded_deltas_round_away(dtype, warned, caplog):
    import logging

    model, tok = tiny_model("llama")
    model.to(dtype)
    with caplog.at_level(logging.WARNING, logger="kelight.editors.pathedit"):
        PathEditor(PathHParams(path_size=4, lr=1e-5)).setup(model, tok)
    messages = [r.getMessage() for r in caplog.records if "rounds away" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert str(dtype) in messages[0] and "--model.dtype float32" in messages[0] and "1e-05" in messages[0]
