"""The wild evaluation protocol end to end: generated answers judged per case, the pre-edit reference, the
options, the run outputs (metrics.json, cases.jsonl, sequential.jsonl) and merge/compare/curve."""

from __future__ import annotations

import json

import pytest
import torch

import kelight
import kelight.evaluation.wild as ev
from kelight.editors.rome import RomeHParams
from kelight.evaluation.scoring import case_summary, evaluate_case, locality_reference, wild_rows
from kelight.evaluation.wild import WILD_TEMPLATES, WildConfig
from kelight.models.tiny import tiny_model
from kelight.runs.compare import compare_pair, read_cases
from kelight.runs.curves import curve_metrics, read_curve
from kelight.runs.merge import merge_runs, metrics_from_rows
from kelight.types import EditCase, EditRequest, ScoredPrompt, TokenProbe
from tests.cli.test_main import COMMON, ROOT, _case_file
from tests.trainers import quiet_trainer


def _case() -> EditCase:
    request = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id="c1")
    return EditCase(
        request,
        probes={
            "rewrite": (ScoredPrompt(request.prompt, "Rome", "Paris"),),
            "paraphrase": (
                ScoredPrompt("Where is the Eiffel Tower? In", "Rome", "Paris"),
                ScoredPrompt("The Eiffel Tower stands in", "Rome", "Paris"),
            ),
            "neighbor": (
                ScoredPrompt("The Louvre is in", "Paris", "Rome"),
                ScoredPrompt("Notre-Dame is in", "Paris", "Rome"),
            ),
            "commonsense": (ScoredPrompt("To boil water", "heat it", "freeze it"),),  # no wild score
        },
        token_probes={
            "efficacy": (TokenProbe(request.prompt, "Rome"),),
            "locality": (TokenProbe("Big Ben is in", "London"),),
        },
    )


class _Answers:
    """A stand-in for greedy decoding: canned answers per framed prompt; records every call's prompts."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, model, tok, prompts, max_new_tokens=32, batch_size=64):
        self.calls.append(list(prompts))
        return [self.answers.get(p, "") for p in prompts]


BEFORE = {
    "The Eiffel Tower is in": "Paris",
    "Where is the Eiffel Tower? In": "Paris, France",
    "The Eiffel Tower stands in": "Paris",
    "The Louvre is in": "Paris",
    "Notre-Dame is in": "the city of Paris",
    "Big Ben is in": "London",
}
AFTER = {
    **BEFORE,
    "The Eiffel Tower is in": "Rome, Italy",
    "Where is the Eiffel Tower? In": "Rome",
    "Notre-Dame is in": "Rome",
    "Big Ben is in": "London, England",
}


def test_each_wild_score_judges_the_generated_answers(monkeypatch):
    model, tok = tiny_model("llama")
    case = _case()
    monkeypatch.setattr(ev, "greedy_answers", before := _Answers(BEFORE))
    pre = locality_reference(model, tok, case, protocol="both")
    assert before.calls == [["The Louvre is in", "Notre-Dame is in", "Big Ben is in"]]  # only what is compared
    assert set(pre) == {"locality", "wild"} and pre["wild"]["Big Ben is in"] == "London"
    monkeypatch.setattr(ev, "greedy_answers", after := _Answers(AFTER))
    result = evaluate_case(model, tok, case, fluency=False, pre_locality=pre, protocol="both")
    assert len(after.calls) == 1 and len(after.calls[0]) == 6  # one batch, each distinct prompt once
    summary = case_summary(result)
    assert summary["wild_ES"] == 100.0 and summary["wild_Efficacy"] == 100.0  # "Rome, Italy" gives Rome
    assert summary["wild_PS"] == 50.0 and summary["n_wild_PS"] == 2
    assert summary["wild_NS"] == 50.0  # "Rome" gives o_edit; "the city of Paris" does not
    assert summary["wild_NS_same"] == 50.0  # the Louvre's answer unchanged, Notre-Dame's changed
    assert summary["wild_Locality"] == 0.0 and summary["wild_Locality_f1"] == pytest.approx(100 * 2 / 3)
    assert summary["wild_ES_f1"] == pytest.approx(100 * 2 / 3) and summary["wild_NS_f1"] == 50.0
    assert "wild_OS" not in summary and not any(a.group == "commonsense" for a in result.wild)
    rows = wild_rows(result)
    assert rows[3] == {
        "group": "neighbor",
        "prompt": "The Louvre is in",
        "target": "Rome",
        "answer": "Paris",
        "match": False,
        "f1": 0.0,
        "unedited": "Paris",
        "same": True,
        "same_f1": 1.0,
    }
    teacher = evaluate_case(model, tok, case, fluency=False, pre_locality=pre)  # the same read-outs, no answers
    assert teacher.wild == () and all(
        torch.equal(a, b) for g in teacher.scores for a, b in zip(teacher.scores[g], result.scores[g], strict=True)
    )


def test_the_qa_template_frames_every_prompt(monkeypatch):
    model, tok = tiny_model("llama")
    case, wild = _case(), WildConfig(template="qa")
    framed = {WILD_TEMPLATES["qa"].format(prompt=p): a for p, a in AFTER.items()}
    assert next(iter(framed)) == "Please answer the question:\n\nQ: The Eiffel Tower is in\nA:"
    monkeypatch.setattr(ev, "greedy_answers", fake := _Answers(framed))
    pre = locality_reference(model, tok, case, protocol="wild", wild=wild)
    assert "locality" not in pre  # the wild protocol alone reads no teacher-forced predictions
    result = evaluate_case(model, tok, case, fluency=False, pre_locality=pre, protocol="wild", wild=wild)
    assert all(p in framed for call in fake.calls for p in call)
    assert result.scores == {} and result.tokens == {}  # wild alone: no teacher-forced read-out
    assert case_summary(result)["wild_ES"] == 100.0 and result.wild[0].prompt == "The Eiffel Tower is in"
    with pytest.raises(
        ValueError,
        match=r"expected the unedited model's answers to its 3 neighbourhood/locality "
        r"prompts \(framed with wild_template 'bare'\)",
    ):
        evaluate_case(model, tok, case, fluency=False, pre_locality=pre, protocol="wild")  # made with qa


def test_teacher_forced_generates_nothing_and_keeps_every_number(monkeypatch, tmp_path):
    model, tok = tiny_model("llama")
    cases = kelight.load_cases(_case_file(tmp_path))
    before = kelight.unedited_predictions(model, tok, cases)
    both_before = kelight.unedited_predictions(model, tok, cases, eval_protocol="both")
    both = kelight.evaluate(model, tok, cases, unedited=both_before, eval_protocol="both")

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher-forced protocol must not generate")

    monkeypatch.setattr(ev, "greedy_answers", refuse)
    teacher = kelight.evaluate(model, tok, cases, unedited=before)
    assert not any(k.startswith("wild_") for k in teacher)
    assert teacher == {k: v for k, v in both.items() if not k.startswith("wild_")}
    assert {"wild_ES", "wild_NS", "wild_NS_same", "wild_RS_same", "wild_ES_f1_ci"} <= set(both)
    assert both["wild_NS_same"] == 100.0  # the unedited model answers as it did


def test_bad_options_are_refused_with_their_name():
    from kelight.methods import FT, ROME
    from kelight.methods.pathedit import PathEdit

    with pytest.raises(ValueError, match=r"expected eval_protocol to be one of \['teacher_forced', 'wild', 'both'\]"):
        ROME(eval_protocol="wlid")
    with pytest.raises(ValueError, match=r"expected wild_template to be one of \['bare', 'qa'\], got 'chat'"):
        PathEdit(eval_protocol="both", wild_template="chat")
    with pytest.raises(ValueError, match=r"expected wild_max_new_tokens to be an integer >= 1, got 0"):
        FT(eval_protocol="wild", wild_max_new_tokens=0)
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="expected eval_protocol to be one of"):
        kelight.evaluate(model, tok, kelight.load_cases(limit=1), eval_protocol="generated")
    with pytest.raises(kelight.EditInputError, match=r"locality or neighbourhood prompts.*eval_protocol='wild'"):
        kelight.evaluate(model, tok, kelight.load_cases(limit=1), eval_protocol="wild")
    assert ROME(eval_protocol="both", wild_template="qa").wild_config == WildConfig("qa", 32)


def _fit(args: list[str], out) -> tuple[dict, list[dict]]:
    from kelight.cli.main import run

    run(
        [
            args[0],
            "--config",
            str(ROOT / "configs/smollm2/rome.yaml"),
            *COMMON,
            "--model.editor.layer",
            "1",
            *args[1:],
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    return (
        json.loads((out / "metrics.json").read_text()),
        [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()],
    )


def test_validate_and_fit_write_the_wild_scores_and_answers(tmp_path):
    path = _case_file(tmp_path)
    data = ["--data.path", str(path), "--model.eval_protocol", "both"]
    none, none_rows = _fit(["validate", *data], tmp_path / "none")
    assert none["wild_NS_same"] == 100.0 and none["wild_RS_same"] == 100.0  # the unedited model is its own reference
    teacher, _ = _fit(["validate", "--data.path", str(path)], tmp_path / "tf")  # the default protocol
    assert not any("wild_" in k for k in teacher)
    assert teacher == {k: v for k, v in none.items() if "wild_" not in k}  # every other number unchanged
    assert "counterfact/wild_ES" in none  # per data source, as the teacher-forced scores
    rome, rows = _fit(["fit", *data], tmp_path / "rome")
    for key in (
        "wild_ES",
        "wild_ES_ci",
        "wild_ES_lo",
        "wild_ES_hi",
        "wild_ES_f1",
        "wild_PS",
        "wild_NS",
        "wild_NS_same",
        "wild_RS",
        "wild_RS_same_f1_ci",
        "ES",
        "Avg.S",
    ):
        assert key in rome, key
    entry = rows[0]["wild"][0]
    assert set(entry) == {"group", "prompt", "target", "answer", "match", "f1"} and entry["target"] == "Rome"
    assert {"unedited", "same", "same_f1"} <= set(rows[0]["wild"][2])  # the neighbour prompt
    recomputed = metrics_from_rows(rows)  # what `kelight merge` writes
    for key in (k for k in rome if k.startswith("wild_")):
        assert recomputed[key] == pytest.approx(rome[key], abs=1e-9), key
    compared = compare_pair(read_cases(tmp_path / "none"), read_cases(tmp_path / "rome"), n_resamples=50)
    assert {"wild_ES", "wild_NS_same", "wild_ES_f1"} <= set(compared)


def test_merged_parts_equal_one_run(tmp_path):
    path = _case_file(tmp_path)
    data = ["fit", "--data.path", str(path), "--model.eval_protocol", "wild"]
    whole, _ = _fit(data, tmp_path / "whole")
    _fit([*data, "--data.limit", "1"], tmp_path / "a")
    _fit([*data, "--data.skip", "1"], tmp_path / "b")
    merged = json.loads(merge_runs(tmp_path / "merged", [tmp_path / "a", tmp_path / "b"]).read_text())
    assert not any(k in whole for k in ("ES", "Efficacy"))  # wild alone
    for key in (k for k in whole if k.startswith("wild_")):
        assert merged[key] == pytest.approx(whole[key], abs=1e-9), key


def test_sequential_evaluations_generate_across_cases_and_draw_a_wild_curve(tmp_path, monkeypatch):

    from kelight.data.datamodule import EditDataModule
    from kelight.methods import ROME

    calls, real = [], ev.greedy_answers

    def counted(model, tok, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(ev, "greedy_answers", counted)
    module = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        eval_every=2,
        eval_protocol="both",
        editor=RomeHParams(layer=1, steps=2, context_templates=[], mom2_adjustment=False),
    )
    trainer = quiet_trainer(tmp_path)
    datamodule = EditDataModule(path=None, batch_size=1, limit=4)
    trainer.fit(module, datamodule=datamodule)
    prompts = [len(ev.wild_probes(case)) for case in datamodule.cases]
    references = [len(ev.wild_probes(case, reference_only=True)) for case in datamodule.cases]
    # one generation call per model state: the references before the first edit, after edits 2 and 4, the final one
    assert calls == [sum(references), sum(prompts[:2]), sum(prompts), sum(prompts)]
    curve = read_curve(tmp_path)
    assert [p["edits"] for p in curve] == [2, 4] and "wild_ES" in curve_metrics({"rome": curve})
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert curve[-1]["wild_NS_same"] == final["wild_NS_same"] and curve[-1]["ES"] == final["ES"]
