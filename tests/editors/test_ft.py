"""FT-L on tiny models of every family: bounded change of one matrix, exact restore, SADR, errors."""

import json
from pathlib import Path

import pytest
import torch

from kelight.editors import ft
from kelight.editors.ft import FTEditor, FTHParams
from kelight.editors.rewrite import build_rewrite_batch
from kelight.editors.steps import EditOptimizationError, forward_logprobs
from kelight.editors.undo import UndoLog
from kelight.objectives import rewrite_nll
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError, EditRequest
from tests.editors.eager import assert_rows_equal_eager

REQ = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id="eiffel")
# subject at the end: the first target token is read straight off the edited residual stream
END = EditRequest("We visited the Eiffel Tower", "Eiffel Tower", "x")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, snap):
    return [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]


def _out_weight_key(editor):
    return f"{editor.adapter.path('mlp_out', editor.hp.layer)}.weight"


@torch.no_grad()
def _rewrite_nll(model, tok, request):
    batch = build_rewrite_batch(tok, request, ["{}"], "cpu", essence_templates=())
    tgt, _, _ = forward_logprobs(model, batch, want_attn=False)
    return rewrite_nll(tgt, batch.target_ids, batch.target_rows, batch.n_rewrite).item()


def test_only_mlp_out_changes_within_bound_and_restore_is_exact(tiny):
    model, tok = tiny
    snap = _snapshot(model)
    eps = 1e-3
    editor = FTEditor(FTHParams(layer=1, steps=5, lr=1e-3, norm_constraint=eps, context_templates=((3, 1),)))
    editor.setup(model, tok)
    undo = UndoLog()
    info = editor.apply(model, tok, [REQ, EditRequest("Paris is the capital of", "Paris", "Spain")], undo)
    key = _out_weight_key(editor)
    assert _changed(model, snap) == [key]
    change = model.state_dict()[key] - snap[key]
    assert change.abs().max() <= eps * (1 + 1e-4)  # the total of both requests, up to rounding of W + ΔW
    assert info.steps == (5, 5) and all(len(losses) == 5 for losses in info.losses)
    torch.testing.assert_close(undo.change_norm(), change.float().norm())  # ‖ΔW‖_F through the undo log
    assert 0 < undo.change_norm().item() and 0 < snap[key].norm().item()
    undo.restore()
    assert _changed(model, snap) == []


def test_model_weights_get_no_gradient(tiny):
    model, tok = tiny
    editor = FTEditor(FTHParams(layer=1, steps=2))
    editor.setup(model, tok)
    editor.apply(model, tok, [REQ], UndoLog())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "gemma3_text"])
def test_fine_tuning_lowers_rewrite_nll(family):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model(family)
    before = _rewrite_nll(model, tok, END)
    # ROME's FT-L defaults move a random tiny model very little, but downhill
    undo = UndoLog()
    editor = FTEditor(FTHParams(layer=1))
    editor.setup(model, tok)
    editor.apply(model, tok, [END], undo)
    assert _rewrite_nll(model, tok, END) < before
    undo.restore()
    # a looser bound gives a clear drop (random tiny models: ~0.15-0.9 nats)
    editor = FTEditor(FTHParams(layer=1, lr=2e-2, norm_constraint=2e-2))
    editor.setup(model, tok)
    info = editor.apply(model, tok, [END], undo)
    assert info.losses[0][0] == pytest.approx(before, abs=1e-5)
    assert _rewrite_nll(model, tok, END) < before - 0.1


def test_unconstrained_moves_further_than_the_bound():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = FTEditor(FTHParams(layer=1, steps=10, lr=1e-2, norm_constraint=float("inf")))
    editor.setup(model, tok)
    delta, _ = editor.compute(model, tok, END)
    assert delta.abs().max() > 1e-2  # Adam's steps add up past one lr when nothing clamps them


def test_sadr_composes():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    seen = []

    def spy(state):
        seen.append((state.step, state.rows.shape[0]))  # (L, B, H, T) query rows of every layer
        return state.rows[-1].sum() * 0.0

    attn_before = model.config._attn_implementation
    sadr = SADR(gamma=0.05, first_layer=2)
    editor = FTEditor(FTHParams(layer=1, steps=4, lr=1e-2, norm_constraint=1e-2), [sadr, spy])
    editor.setup(model, tok)
    undo = UndoLog()
    info = editor.apply(model, tok, [REQ], undo)
    assert seen == [(s, model.config.num_hidden_layers) for s in range(4)]
    assert len(sadr.selected) == 4 and sadr.vanilla is not None  # called every step, vanilla at step 0
    assert all(torch.isfinite(torch.tensor(losses)).all() for losses in info.losses)
    assert model.config._attn_implementation == attn_before  # the row kernel only during the edit
    undo.restore()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gptj"])
def test_sadr_on_attention_rows_equals_sadr_on_eager_attention(family, monkeypatch):
    def edit(model, tok, sadr):
        editor = FTEditor(FTHParams(layer=0, steps=4, lr=5e-2, norm_constraint=1.0), [sadr])
        editor.setup(model, tok)
        return list(editor.apply(model, tok, [REQ], UndoLog()).losses[0])

    assert_rows_equal_eager(monkeypatch, ft, family, edit)


def test_nan_loss_raises_and_leaves_weights(monkeypatch):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("gpt2")
    snap = _snapshot(model)
    calls = []

    def poisoned(*args):  # finite at steps 0 and 1, NaN from step 2 on
        calls.append(1)
        return rewrite_nll(*args) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(ft, "rewrite_nll", poisoned)
    editor = FTEditor(FTHParams(layer=1, steps=5))
    editor.setup(model, tok)
    with pytest.raises(EditOptimizationError, match="fine-tuning diverged at step 2"):
        editor.apply(model, tok, [REQ], UndoLog())
    assert _changed(model, snap) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"layer": -1}, "layer"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"norm_constraint": 0.0}, "norm_constraint"),
        ({"norm_constraint": float("nan")}, "norm_constraint"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"context_templates": ((5,),)}, "context_templates"),
        ({"context_templates": ((5, -2),)}, r"pairs of positive integers, .* got \(5, -2\)"),
        ({"context_templates": (5, 10)}, "write each pair in its own brackets"),
        ({"layer": True}, "expected layer to be one layer index"),
        ({"layer": "1"}, "expected layer to be one layer index"),
    ],
)
def test_hparams_reject_bad_values(kwargs, match):
    with pytest.raises(EditInputError, match=match):
        FTHParams(**kwargs)


def test_layer_out_of_range_and_apply_before_setup():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layer 7 is out of range .* \[0, 2\]"):
        FTEditor(FTHParams(layer=7)).setup(model, tok)
    with pytest.raises(RuntimeError, match=r"call FTEditor\.setup\(model, tokenizer\) before computing edits"):
        FTEditor(FTHParams(layer=1)).apply(model, tok, [REQ], UndoLog())


def test_empty_request_list_is_refused():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    editor = FTEditor(FTHParams(layer=1, steps=1))
    editor.setup(model, tok)
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        editor.apply(model, tok, [], UndoLog())
    assert _changed(model, snap) == []


def test_cli_fit_writes_contract_and_restores(tmp_path):
    from kelight.cli.main import run
    from kelight.models.tiny import tiny_model
    from tests.cli.test_main import ROOT, _case_file

    out = tmp_path / "run"
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/smollm2/ft.yaml"),
            "--model.model_name",
            "tiny:llama",
            "--model.editor.layer",
            "1",
            "--model.editor.steps",
            "3",
            "--model.editor.sadr_gamma",
            "0.01",
            "--model.fluency",
            "false",
            "--data.path",
            str(_case_file(tmp_path)),
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["seconds_per_edit"] > 0 and "ES" in metrics
    assert len(Path(out / "cases.jsonl").read_text().splitlines()) == 2
    fresh, _ = tiny_model("llama")
    for (name, a), b in zip(cli.model.lm.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
