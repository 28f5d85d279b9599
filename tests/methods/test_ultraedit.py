"""UltraEdit as a method: its arguments reach the editor, bad ones are refused before a model loads, the
regimes keep or reset the running moments, and the API and the CLI run it with an exact restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kelight
from kelight.cli.main import run
from kelight.data.datamodule import EditDataModule
from kelight.editors.ultraedit import UltraEditHParams, UltraEditor
from kelight.methods.ultraedit import UltraEdit
from kelight.models.tiny import tiny_model
from kelight.types import EditInputError, EditRequest
from tests.conftest import COUNTERFACT_EDIT_CASES
from tests.trainers import quiet_trainer

ROOT = Path(__file__).resolve().parents[2]
REQ = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", case_id="eiffel")
FUJI = EditRequest("Mount Fuji is in", "Mount Fuji", "Peru", case_id="fuji")


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(COUNTERFACT_EDIT_CASES))
    return path


def test_arguments_reach_the_editor(tmp_path):
    module = UltraEdit(
        model_name="tiny:llama",
        editor=UltraEditHParams(
            layers=[1, 2],
            lr=0.02,
            ridge=3.0,
            tokens="all",
            pool_layers=False,
            whiten=True,
            whiten_floor=1e-4,
            stats_dtype="float32",
            warmup_path=str(_data(tmp_path)),
            warmup_skip=1,
            warmup_limit=1,
        ),
    )
    editor = module.build_editor()
    assert isinstance(editor, UltraEditor)
    hp = editor.hp
    assert (hp.layers, hp.lr, hp.ridge, hp.tokens, hp.pool_layers) == ((1, 2), 0.02, 3.0, "all", False)
    assert (hp.whiten, hp.whiten_floor, hp.stats_dtype) == (True, 1e-4, "float32")
    assert [r.subject for r in editor.warmup] == ["Mount Fuji"]  # the second record only
    assert UltraEdit(model_name="tiny:llama").build_editor().warmup == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "expected lr to be a finite number > 0, got -1.0"),
        ({"layers": [3, 1]}, "ascending"),
        ({"tokens": "subject"}, r"expected tokens to be one of \['target', 'all'\], got 'subject'"),
        ({"warmup_limit": 0}, "expected warmup_limit to be an integer ≥ 1, got 0"),
        ({"warmup_skip": -2}, "expected warmup_skip to be an integer ≥ 0, got -2"),
    ],
)
def test_bad_arguments_are_refused_before_any_model_loads(kwargs, match):
    with pytest.raises(EditInputError, match=match):  # the module's options are its editor's hyper-parameters
        UltraEdit(model_name="tiny:llama", editor=UltraEditHParams(**kwargs))


def _fit(module: UltraEdit, tmp_path: Path, batch_size: int, monkeypatch) -> list[tuple[int, int]]:
    """Run a fit; returns ``(requests, moments' feature count before)`` of every turn."""
    turns = []
    original = UltraEditor.apply

    def spy(editor, model, tok, requests, undo):
        turns.append((len(requests), editor.stats[None].count))
        return original(editor, model, tok, requests, undo)

    monkeypatch.setattr(UltraEditor, "apply", spy)
    trainer = quiet_trainer(tmp_path / "run")
    trainer.fit(module, datamodule=EditDataModule(path=str(_data(tmp_path)), batch_size=batch_size))
    return turns


@pytest.mark.parametrize(
    ("regime", "batch_size", "requests", "moments_grow"),
    [
        ("consecutive", 2, [2, 1], True),  # each loader batch one turn, the moments kept across turns
        ("sequential", 1, [1, 1, 1], True),
        ("single", 1, [1, 1, 1], False),  # restored after each case: every turn starts from the warm-up's moments
        ("batch", 2, [2, 1], False),
    ],
)
def test_regimes_keep_or_reset_the_moments_and_restore_the_weights(
    tmp_path, monkeypatch, regime, batch_size, requests, moments_grow
):
    module = UltraEdit(
        model_name="tiny:llama", fluency=False, regime=regime, editor=UltraEditHParams(layers=[1, 2], lr=0.01)
    )
    module.configure_model()
    snap = {k: v.clone() for k, v in module.lm.state_dict().items()}
    turns = _fit(module, tmp_path, batch_size, monkeypatch)
    assert [n for n, _ in turns] == requests
    counts = [count for _, count in turns]
    grows = all(a < b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0] == 0 and (grows if moments_grow else set(counts) == {0})
    assert module.final_metrics["n_cases"] == 3
    assert all(torch.equal(v, snap[k]) for k, v in module.lm.state_dict().items())  # restored when the fit ends
    assert module.editor.stats is module.editor.initial


def test_session_turns_share_the_moments_and_restore_exactly(tmp_path):
    model, tok = tiny_model("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    warmup = {"warmup_path": str(_data(tmp_path)), "warmup_skip": 1, "warmup_limit": 1}  # the record of FUJI
    session = kelight.EditSession(model, tok, method="ultraedit", layers=[1, 2], lr=0.01, **warmup)
    assert [(r.prompt, r.subject, r.target_new) for r in session.editor.warmup] == [(FUJI.prompt, "Mount Fuji", "Peru")]
    warm = session.editor.stats[None].count
    session.edit(REQ)
    after_one = session.editor.stats[None].count
    with pytest.raises(EditInputError, match="of one joint edit rewrite the same prompt"):  # a failed turn ...
        session.edit([FUJI, EditRequest(FUJI.prompt, FUJI.subject, "Chad", case_id="chad")])
    assert session.editor.stats[None].count == after_one  # ... keeps the moments and the earlier edit
    session.edit([FUJI])
    assert warm < after_one < session.editor.stats[None].count and session.n_edits == 2
    session.restore()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert session.editor.stats[None].count == warm  # back to the warm-up's moments


def test_edit_refuses_options_ultraedit_does_not_have():
    model, tok = tiny_model("llama")
    with pytest.raises(EditInputError, match=r"unknown ultraedit option\(s\) \['sadr_gamma'\]"):
        kelight.edit(model, tok, REQ, method="ultraedit", layers=[1, 2], sadr_gamma=0.1)


def test_consecutive_fit_through_the_cli_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/smollm2/ultraedit.yaml"),
            "--model.model_name",
            "tiny:llama",
            "--model.editor.layers",
            "[1, 2]",
            "--model.fluency",
            "false",
            "--model.regime",
            "consecutive",
            "--model.eval_every",
            "2",
            "--data.batch_size",
            "2",
            "--data.path",
            str(_data(tmp_path)),
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 3 and metrics["seconds_per_edit"] > 0
    for key in ("Efficacy", "Generality", "Locality"):
        assert key in metrics
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all("z_steps" not in r for r in rows[:2])  # one turn of two
    curve = [json.loads(line) for line in (out / "sequential.jsonl").read_text().splitlines()]
    assert [point["edits"] for point in curve] == [2]  # the multiples of eval_every reached
