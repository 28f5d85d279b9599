"""``kelight.edit`` refuses malformed options and requests up front, naming the fix, and leaves every weight as
it was (the round trips: tests/editors/test_rome.py)."""

import pytest
import torch

import kelight
from kelight.models.tiny import tiny_model
from kelight.types import EditInputError, EditRequest

REQ = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id="eiffel")
BERLIN = EditRequest(REQ.prompt, REQ.subject, "Berlin", case_id="eiffel-berlin")
OPTS = {"rome": {"layer": 1, "mom2_adjustment": False, "context_templates": [], "steps": 2},
        "memit": {"layers": [0, 1], "mom2_corpus": "model", "mom2_n_tokens": 200, "context_templates": [],
                  "steps": 2},
        "ft": {"layer": 1, "steps": 2}, "pathedit": {"path_size": 2, "epochs": 1}}
OPTS["pmet"] = OPTS["memit"]
OPTS["alphaedit"] = {**OPTS["memit"], "nullspace_threshold": 1.0}
TEMPLATES = r"expected context_templates to be \[length, count\] pairs of positive integers"


def _refused(method, request, match, **overrides):
    """``kelight.edit`` raises EditInputError matching ``match``; every state-dict tensor is unchanged."""
    model, tok = tiny_model("llama")
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditInputError, match=match):
        kelight.edit(model, tok, request, method=method, **{**OPTS[method], **overrides})
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


@pytest.mark.parametrize("method", ["rome", "memit", "ft", "pathedit"])
@pytest.mark.parametrize("gamma", [-1.0, float("nan"), float("inf"), "0.1"])
def test_sadr_gamma_must_be_finite_and_non_negative(method, gamma):
    _refused(method, REQ, r"expected sadr_gamma to be a finite number ≥ 0, got .*; use 0 to turn SADR off",
             sadr_gamma=gamma)


def test_sadr_selective_must_be_a_bool():
    _refused("rome", REQ, "expected sadr_selective to be true or false, got 'no'", sadr_gamma=0.1, sadr_selective="no")


@pytest.mark.parametrize("method", ["rome", "memit", "ft"])
@pytest.mark.parametrize("templates", [[[5, -2]], [[0, 2]], [[-1, 2]], [[5]], [5, 10], 5])
def test_context_templates_are_checked_by_every_method(method, templates):
    _refused(method, REQ, TEMPLATES, context_templates=templates)


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "alphaedit", "ft", "pathedit"])
@pytest.mark.parametrize("request_", [[], [[]]])
def test_empty_request_list_is_refused_by_every_method(method, request_):
    _refused(method, request_, "expected at least one edit request, got none")


@pytest.mark.parametrize("method", ["memit", "alphaedit", "pathedit"])
def test_conflicting_targets_in_one_joint_edit_are_refused(method):
    _refused(method, [REQ, BERLIN], r"requests 0 and 1 \(cases 'eiffel', 'eiffel-berlin'\) .* subject 'Eiffel Tower'"
                                    r" to different targets .* edit them in turn")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"mom2_update_weight": 1400.0}, r"unknown alphaedit option\(s\) \['mom2_update_weight'\]; valid options"),
    ({"pmet": True}, r"unknown alphaedit option\(s\) \['pmet'\]; valid options"),
    ({"nullspace_threshold": 1e-30}, "leaves no null space at layer 0"),
    ({"nullspace_threshold": None}, r"expected nullspace_threshold to be a finite number > 0, got None"),
    ({"nullspace_l2": 0.0}, "nullspace_l2 to be a finite number > 0"),
])
def test_alphaedit_options_are_checked(overrides, match):
    _refused("alphaedit", REQ, match, **overrides)


def test_alphaedit_edit_round_trips_bit_exact():
    model, tok = tiny_model("llama")
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model, undo = kelight.edit(model, tok, REQ, method="alphaedit", **OPTS["alphaedit"])
    assert len(undo) == 2  # both layers' output matrices changed
    undo.restore()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 0.0])
def test_mom2_update_weight_must_be_finite_and_positive(weight):
    _refused("memit", REQ, r"expected mom2_update_weight to be a finite number > 0", mom2_update_weight=weight)


@pytest.mark.parametrize(("record", "match"), [
    ({"prompt": REQ.prompt, "subject": REQ.subject}, r"missing \['target_new'\]"),
    ({"prompt": REQ.prompt, "subject": REQ.subject, "target_new": "Rome", "target": "x"}, r"unknown \['target'\]"),
])
def test_request_dict_keys_are_named(record, match):
    _refused("rome", record, rf"expected an edit request with keys \['prompt', 'subject', 'target_new'\].*{match}")


@pytest.mark.parametrize("method", ["rome", "ft"])
@pytest.mark.parametrize("layer", ["1", [1], True, -1])
def test_layer_must_be_one_integer(method, layer):
    _refused(method, REQ, r"expected layer to be one layer index, an integer ≥ 0 \(e.g. layer=4\)", layer=layer)


@pytest.mark.parametrize("layers", [1, "01", [True, 1], [1.0]])
def test_layers_must_be_a_list_of_integers(layers):
    _refused("memit", REQ, r"expected layers to be a list of layer indices, integers ≥ 0 \(e.g. layers=\[2, 3, 4\]\)",
             layers=layers)


def _alphaedit_session():
    model, tok = tiny_model("llama")
    return kelight.EditSession(model, tok, method="alphaedit", **OPTS["alphaedit"])


def test_session_edits_build_on_each_other_and_restore_bit_exact():
    """AlphaEdit through the API: the second edit keeps the first's keys (K_p K_pᵀ), as in the sequential
    regime; restore returns every weight and forgets the keys."""
    session = _alphaedit_session()
    snap = {k: v.detach().clone() for k, v in session.model.state_dict().items()}
    mount_fuji = EditRequest("Mount Fuji is located in", "Mount Fuji", "Peru", "Japan", case_id="fuji")
    session.edit(REQ)
    first = {layer: g.clone() for layer, g in session.editor.edited_gram.items()}
    session.edit(mount_fuji)
    assert session.n_edits == 2 and len(session.undo) == 2
    for layer, gram in session.editor.edited_gram.items():
        assert torch.linalg.matrix_rank(gram) == 2 and not torch.equal(gram, first[layer])
    session.restore()
    assert session.editor.edited_gram == {} and session.n_edits == 0
    assert all(torch.equal(v, snap[k]) for k, v in session.model.state_dict().items())


def test_a_failed_session_edit_leaves_the_earlier_edits_and_their_record(monkeypatch):
    """The second edit fails after writing its first layer: the weights return to the state after the first
    edit (bit-exact) and AlphaEdit's record of edited keys is the first edit's alone."""
    session = _alphaedit_session()
    session.edit(REQ)
    after_first = {k: v.detach().clone() for k, v in session.model.state_dict().items()}
    gram = {layer: g.clone() for layer, g in session.editor.edited_gram.items()}
    solve = session.editor.solve
    calls = []

    def failing_second_layer(layer, keys, resid):
        calls.append(layer)
        if len(calls) == 2:
            raise FloatingPointError("singular")
        return solve(layer, keys, resid)

    monkeypatch.setattr(session.editor, "solve", failing_second_layer)
    with pytest.raises(FloatingPointError, match="singular"):
        session.edit(EditRequest("Mount Fuji is located in", "Mount Fuji", "Peru", "Japan"))
    assert calls == [0, 1] and session.n_edits == 1
    assert all(torch.equal(v, after_first[k]) for k, v in session.model.state_dict().items())
    assert all(torch.equal(session.editor.edited_gram[layer], g) for layer, g in gram.items())


def test_session_refuses_an_unknown_method_before_setup():
    model, tok = tiny_model("llama")
    with pytest.raises(EditInputError, match=r"unknown method 'alpha'; expected one of \['rome', 'memit'"):
        kelight.EditSession(model, tok, method="alpha")


def _counterfact_edit_file(tmp_path):
    import json

    from tests.conftest import COUNTERFACT_EDIT_CASES

    path = tmp_path / "edit.json"
    path.write_text(json.dumps(COUNTERFACT_EDIT_CASES))
    return path


@pytest.mark.parametrize("data", ["mix", "edit"])
def test_evaluate_scores_as_kelight_validate(tmp_path, data):
    """The Python scorer gives the CLI's numbers for the same cases on the same (unedited) model."""
    import json

    from kelight.cli.main import run
    from tests.cli.test_main import COMMON, ROOT, _case_file

    path = _case_file(tmp_path) if data == "mix" else _counterfact_edit_file(tmp_path)
    run(["validate", "--config", str(ROOT / "configs/smollm2/rome.yaml"), *COMMON, "--data.path", str(path),
         "--trainer.default_root_dir", str(tmp_path / "cli")])
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    model, tok = kelight.load("tiny:llama")
    cases = kelight.load_cases(path)
    scores = kelight.evaluate(model, tok, cases, unedited=kelight.unedited_predictions(model, tok, cases))
    pooled = {k for k in cli if "/" not in k and k not in ("seconds_per_edit", "z_steps_per_edit")}
    assert set(scores) == pooled and scores["n_cases"] == len(cases)
    for key, value in scores.items():
        assert value == pytest.approx(cli[key], rel=1e-9, abs=1e-9), key
    if data == "edit":
        assert scores["Locality"] == 100.0  # the unedited model agrees with itself


def test_evaluate_after_an_edit_compares_locality_with_the_unedited_model(tmp_path):
    model, tok = tiny_model("llama")
    cases = kelight.load_cases(_counterfact_edit_file(tmp_path))
    before = kelight.unedited_predictions(model, tok, cases)
    with pytest.raises(EditInputError, match=r"have locality prompts.*call kelight.unedited_predictions\(model, "
                                             r"tok, cases\) before editing"):
        kelight.evaluate(model, tok, cases)
    with pytest.raises(EditInputError, match=r"expected one unedited prediction per case, got 1 for 3"):
        kelight.evaluate(model, tok, cases, unedited=before[:1])
    with pytest.raises(EditInputError, match=r"expected a non-empty list of EditCase"):
        kelight.evaluate(model, tok, [c.request for c in cases], unedited=before)
    with torch.no_grad():  # a stand-in for a damaging edit: the predictions on the locality prompts move
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = kelight.evaluate(model, tok, cases, unedited=before)
    fresh = kelight.evaluate(model, tok, cases, unedited=kelight.unedited_predictions(model, tok, cases))
    assert after["Locality"] < 100.0 == fresh["Locality"]
