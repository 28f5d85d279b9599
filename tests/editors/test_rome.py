"""ROME on tiny models of every family: the update hits its target, restore is bit-exact, errors."""

import pytest
import torch

import kelight
from kelight.editors.locate.keys import mean_keys, subject_keys
from kelight.editors.locate.zopt import ZConfig
from kelight.editors.rewrite import build_rewrite_batch
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.steps import EditOptimizationError
from kelight.editors.undo import UndoLog
from kelight.types import EditInputError, EditRequest

REQ = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id="eiffel")
FAST = dict(mom2_adjustment=False, context_templates=((3, 2),), steps=4)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def test_edit_then_restore_is_bit_identical(tiny):
    model, tok = tiny
    snap = _snapshot(model)
    editor = RomeEditor(RomeHParams(layer=1, **FAST))
    editor.setup(model, tok)
    undo = UndoLog()
    editor.apply(model, tok, [REQ, EditRequest("Paris is the capital of", "Paris", "Spain")], undo)
    assert any(not torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    undo.restore()
    _assert_identical(model, snap)


@pytest.mark.parametrize("mean_key", [False, True])
def test_update_writes_v_star_at_the_insertion_key(tiny, mean_key):
    """W' k = W k + δ at the plain prompt's key (ROME) or the template-averaged key (R-ROME)."""
    model, tok = tiny
    editor = RomeEditor(RomeHParams(layer=1, mean_key_insertion=mean_key, **FAST))
    editor.setup(model, tok)
    delta, z = editor.compute(model, tok, REQ)
    if mean_key:
        key = mean_keys(model, tok, editor.adapter, 1, REQ, editor.templates).double()
    else:
        key = subject_keys(model, tok, editor.adapter, [1], [REQ.prompt], REQ.subject)[1][0].double()
    w = editor.adapter.out_weight_as_linear(model, 1).double()
    torch.testing.assert_close((w + delta) @ key, w @ key + z.delta[0].double(), rtol=1e-6, atol=1e-6)
    # the plain-prompt value is exactly the optimisation's starting value v_init
    if not mean_key:
        torch.testing.assert_close(w @ key, z.v_init[0].double(), rtol=1e-4, atol=1e-5)


def test_z_optimisation_lowers_rewrite_loss():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = RomeEditor(RomeHParams(layer=1, mom2_adjustment=False, context_templates=(), steps=25, lr=0.5,
                                    kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=1e6))
    editor.setup(model, tok)
    # subject at the end: the first target token is read straight off the edited residual stream
    # (a random tiny model's logits are near-uniform, so only a modest drop is possible)
    _, z = editor.compute(model, tok, EditRequest("We visited the Eiffel Tower", "Eiffel Tower", "x"))
    assert z.steps_run == 25 and z.losses[-1] < z.losses[0] - 0.2
    assert all(b <= a + 1e-6 for a, b in zip(z.losses, z.losses[1:], strict=False))


def test_rewrite_batch_positions():
    from kelight.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    batch = build_rewrite_batch(tok, REQ, ["{}", "Hi. {}"], "cpu")
    text = tok.decode(batch.input_ids[0][: int(batch.attention_mask[0].sum())])
    assert text == "The Eiffel Tower is in Rom"  # prompt + target[:-1]
    # the subject's last token is 'r' of "Tower"; the query row predicts the first target token
    assert tok.decode(batch.input_ids[0, batch.subject_pos[0]]) == "r"
    assert tok.decode(batch.input_ids[1, batch.query_pos[1]]) == "n"
    assert tok.decode(batch.target_ids[batch.target_rows == 0]) == " Rome"
    assert batch.n_rewrite == 2 and batch.input_ids.shape[0] == 3  # + essence prompt


def test_nan_during_optimisation_raises_and_leaves_weights(monkeypatch):
    from kelight.editors.locate import zopt
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    calls = []

    def poisoned(log_probs, init):  # finite at step 0, NaN from step 2 on
        calls.append(1)
        return log_probs.sum(-1) * (float("nan") if len(calls) > 2 else 0.0)  # (E,) per essence prompt

    monkeypatch.setattr(zopt, "essence_kl_rows", poisoned)
    with pytest.raises(EditOptimizationError, match="diverged at step 2"):
        kelight.edit(model, tok, [REQ, REQ], layer=1, mom2_adjustment=False, context_templates=[], steps=5)
    _assert_identical(model, snap)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layer": True}, "expected layer to be one layer index"),
    ({"layer": (1,)}, "MEMIT/PMET take layers"),
    ({"context_templates": ((5, -2),)}, r"pairs of positive integers, .* got \(5, -2\)"),
    ({"context_templates": ((0, 2),)}, r"got \(0, 2\)"),
    ({"context_templates": ((5,),)}, r"got \(5,\)"),
    ({"context_templates": (5, 10)}, "write each pair in its own brackets"),
])
def test_hparams_reject_bad_values(kwargs, match):
    with pytest.raises(EditInputError, match=match):
        RomeHParams(**kwargs)


def test_empty_request_list_is_refused():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    editor = RomeEditor(RomeHParams(layer=1, **FAST))
    editor.setup(model, tok)
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        editor.apply(model, tok, [], UndoLog())
    _assert_identical(model, snap)


@pytest.mark.parametrize(("field", "value"), [("lr", float("nan")), ("lr", 0.0), ("steps", 0),
                                              ("kl_factor", -1.0), ("clamp_norm_factor", float("inf"))])
def test_zconfig_rejects_bad_values(field, value):
    with pytest.raises(EditInputError, match=field):
        ZConfig(**{field: value})


def test_api_edit_and_undo_roundtrip():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("gpt2")
    snap = _snapshot(model)
    model, undo = kelight.edit(model, tok, {"prompt": REQ.prompt, "subject": REQ.subject, "target_new": "Rome"},
                               layer=1, mom2_adjustment=False, context_templates=[[3, 1]], steps=3)
    assert not torch.equal(model.transformer.h[1].mlp.c_proj.weight, snap["transformer.h.1.mlp.c_proj.weight"])
    undo.restore()
    _assert_identical(model, snap)


@pytest.mark.parametrize(
    ("kwargs", "request_", "match"),
    [
        ({"layer": 7}, REQ, r"layer 7 is out of range .* \[0, 2\]"),
        ({"layr": 1}, REQ, r"unknown rome option\(s\) \['layr'\]"),
        ({"layer": 1}, {"prompt": "Paris is big", "subject": "Rome", "target_new": "x"}, "does not occur"),
        ({"layer": 1}, {"prompt": "Paris is big", "subject": "Paris", "target_new": "  "}, "non-empty"),
        ({"layer": 2}, REQ, "gets no gradient .* Choose an earlier layer"),  # the last of 3 layers: z is inert
    ],
)
def test_api_errors_leave_model_unchanged(kwargs, request_, match):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises((EditInputError, ValueError), match=match):
        kelight.edit(model, tok, request_, mom2_adjustment=False, context_templates=[], **kwargs)
    _assert_identical(model, snap)


@pytest.mark.parametrize("method", ["memit", "pmet", "ft", "pathedit"])
def test_api_other_methods_roundtrip(method):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    opts = {"memit": {"layers": [0, 1], "mom2_corpus": "model", "mom2_n_tokens": 200, "steps": 2},
            "ft": {"layer": 1, "steps": 2}, "pathedit": {"path_size": 2, "epochs": 2, "lr": 1e-2}}
    opts["pmet"] = opts["memit"]
    model, undo = kelight.edit(model, tok, [REQ], method=method, **opts[method])
    assert len(undo) >= 1
    undo.restore()
    _assert_identical(model, snap)


def test_unknown_method():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    with pytest.raises(EditInputError, match="unknown method 'grace'"):
        kelight.edit(model, tok, REQ, method="grace")
