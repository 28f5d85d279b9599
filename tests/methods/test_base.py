"""EditModule behaviour not tied to one editor."""

from __future__ import annotations

import pytest

from kelight.editors.pathedit import PathHParams
from kelight.editors.rome import RomeHParams
from tests.conftest import COUNTERFACT_EDIT_CASES
from tests.trainers import quiet_trainer


def test_long_runs_log_progress(tmp_path, caplog):
    import logging

    from kelight.data.datamodule import EditDataModule
    from kelight.methods import ROME

    module = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        editor=RomeHParams(layer=1, steps=2, context_templates=[], mom2_adjustment=False),
    )
    module.progress_seconds = 0.0  # every edit
    trainer = quiet_trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="kelight.methods.base"):
        trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=2, limit=4))
    lines = [r.getMessage() for r in caplog.records if "edits done" in r.getMessage()]
    # the sequential regime edits a loader batch of 2 one case at a time; the total counts cases, not batches
    assert [line.split(" edits")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # done / this process's total
    assert "sequential regime" in lines[-1]
    assert lines[0].endswith("min left") and lines[-1].endswith("about 0.0 min left")


def _seq_evaluations(tmp_path, module, batch_size: int) -> list[int]:

    from kelight.data.datamodule import EditDataModule

    logged = []  # edits in place at each seq/* evaluation
    original = module.log_dict
    module.log_dict = lambda metrics, **kw: (logged.append(len(module.pending)), original(metrics, **kw))
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=batch_size, limit=5))
    return logged


def test_sequential_eval_every_counts_edits_not_loader_batches(tmp_path):
    from kelight.methods import ROME
    from kelight.methods.pathedit import PathEdit

    rome = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        eval_every=2,
        editor=RomeHParams(layer=1, steps=2, context_templates=[], mom2_adjustment=False),
    )
    assert _seq_evaluations(tmp_path / "rome", rome, batch_size=3) == [2, 4]  # after edits 2 and 4 of 5
    path = PathEdit(
        model_name="tiny:llama",
        fluency=False,
        regime="consecutive",
        eval_every=3,
        editor=PathHParams(path_size=4, epochs=2, lr=1e-2),
    )
    assert _seq_evaluations(tmp_path / "path", path, batch_size=2) == [4]  # joint edits of 2: 2, 4 (passes 3), 5


def test_sequential_eval_every_writes_the_curve_into_the_run_directory(tmp_path):
    """``sequential.jsonl``: one line per evaluation, the metrics of the cases edited so far; the point
    after the last edit equals the run's final metrics.json."""
    import json

    from kelight.data.datamodule import EditDataModule
    from kelight.methods import ROME

    module = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        eval_every=2,
        editor=RomeHParams(layer=1, steps=2, context_templates=[], mom2_adjustment=False),
    )
    (tmp_path / "sequential.jsonl").write_text('{"edits": 99}\n')  # a stale file of an earlier run is replaced
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=1, limit=4))
    curve = [json.loads(line) for line in (tmp_path / "sequential.jsonl").read_text().splitlines()]
    assert [point["edits"] for point in curve] == [2, 4]
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert curve[-1]["ES"] == final["ES"] and curve[-1]["NS"] == final["NS"]
    assert abs(curve[-1]["EM"] - final["EM"]) < 1e-9


def test_a_failure_in_the_sequential_evaluation_leaves_the_unedited_weights(tmp_path, monkeypatch):
    """The sequential regime keeps its edits until the end; an error in the final evaluation (outside the
    edit's own guard; Lightning then skips on_fit_end) must still restore them, bit-exact."""
    import pytest
    import torch

    from kelight.data.datamodule import EditDataModule
    from kelight.methods import ROME

    module = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        editor=RomeHParams(layer=1, steps=2, context_templates=[], mom2_adjustment=False),
    )
    module.configure_model()
    snap = {k: v.clone() for k, v in module.lm.state_dict().items()}

    def fail(*args, **kwargs):
        assert len(module.undo) > 0  # the edits are in place when the evaluation starts
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(module, "_evaluate", fail)
    trainer = quiet_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=1, limit=2))
    assert all(torch.equal(v, snap[k]) for k, v in module.lm.state_dict().items())


def test_sequential_locality_compares_with_the_unedited_model(tmp_path, monkeypatch):
    import json

    import torch

    import kelight.methods.base as km
    from kelight.data.datamodule import EditDataModule
    from kelight.editors.rome import RomeEditor
    from kelight.methods import ROME
    from kelight.models.tiny import tiny_model

    events, seen = [], {}
    real_reference = km.locality_reference

    def reference(model, tok, case, *args, **kwargs):
        events.append("reference")
        return real_reference(model, tok, case, *args, **kwargs)

    monkeypatch.setattr(km, "locality_reference", reference)
    module = ROME(
        model_name="tiny:llama",
        fluency=False,
        regime="sequential",
        editor=RomeHParams(layer=1, steps=5, lr=1.0, context_templates=[], mom2_adjustment=False),
    )
    real_apply, real_evaluate = RomeEditor.apply, module._evaluate
    monkeypatch.setattr(RomeEditor, "apply", lambda *a, **k: (events.append("edit"), real_apply(*a, **k))[1])
    monkeypatch.setattr(
        module,
        "_evaluate",
        lambda case, pre, ppl=None: (seen.__setitem__(case.case_id, pre), real_evaluate(case, pre, ppl))[1],
    )
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(COUNTERFACT_EDIT_CASES))
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, datamodule=EditDataModule(path=str(path), format="counterfact_edit", batch_size=1))
    assert events == ["reference"] * 3 + ["edit"] * 3  # every reference before the first edit
    fresh, tok = tiny_model("llama")
    for case in trainer.datamodule.cases:
        expected = real_reference(fresh, tok, case)["locality"]
        assert all(torch.equal(a, b) for a, b in zip(seen[case.case_id]["locality"], expected, strict=True))


def _ppl_by_hand(model, tok, texts: list[str]) -> float:
    """Corpus perplexity with plain HF forwards: each text (cut to 100 tokens) on its own, no padding."""
    import math

    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"][:100]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def _run(module, tmp_path, fn: str, limit: int = 2) -> dict:
    import json

    from kelight.data.datamodule import EditDataModule

    trainer = quiet_trainer(tmp_path)
    getattr(trainer, fn)(module, datamodule=EditDataModule(path=None, limit=limit))
    return {
        "metrics": json.loads((tmp_path / "metrics.json").read_text()),
        "rows": [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()],
    }


def test_ppl_corpus_reports_each_models_perplexity(tmp_path):
    """PPL of the unedited model equals a plain forward's; after an edit each case reports its edited
    model's (different) perplexity; the sequential regime scores its one final model once for all."""
    import json
    import math

    import pytest

    from kelight.editors.rome import RomeHParams
    from kelight.methods import ROME
    from kelight.models.tiny import tiny_model

    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "x"]
    corpus = tmp_path / "ppl.json"
    corpus.write_text(json.dumps([{"Text": t} for t in texts]))
    kw = dict(
        model_name="tiny:llama",
        editor=RomeHParams(layer=1, steps=3, context_templates=[], mom2_adjustment=False),
        fluency=False,
        ppl_corpus=str(corpus),
    )
    unedited = _run(ROME(**kw), tmp_path / "none", "validate")
    model, tok = tiny_model("llama")
    expected = _ppl_by_hand(model, tok, texts[:2])  # "x" is one token: nothing to predict
    assert unedited["metrics"]["PPL"] == pytest.approx(expected, rel=1e-6)
    assert all(r["PPL"] == pytest.approx(expected, rel=1e-6) for r in unedited["rows"])
    edited = _run(ROME(**kw), tmp_path / "rome", "fit")
    ppl = [r["PPL"] for r in edited["rows"]]
    assert all(not math.isclose(p, expected, rel_tol=1e-6) for p in ppl)  # the edited model's, not the unedited
    assert edited["metrics"]["PPL"] == pytest.approx(math.exp(sum(map(math.log, ppl)) / len(ppl)), rel=1e-6)
    seq = _run(ROME(**kw, regime="sequential"), tmp_path / "seq", "fit")
    assert seq["rows"][0]["PPL"] == seq["rows"][1]["PPL"] != ppl[0]  # both edits in place, one model


def test_ppl_corpus_errors_name_the_option():
    import pytest

    from kelight.methods import ROME

    with pytest.raises(FileNotFoundError, match="expected ppl_corpus to be one of \\['corpus50'\\] or an existing"):
        ROME(ppl_corpus="corpus5O")


def test_eval_every_outside_the_regimes_that_keep_edits_is_refused():
    import pytest

    from kelight.methods import MEMIT, ROME

    with pytest.raises(
        ValueError,
        match=r"the single regime restores each edit .* --model.regime sequential or "
        r"consecutive, or drop --model.eval_every",
    ):
        ROME(eval_every=10)  # silently ignored before
    with pytest.raises(ValueError, match=r"the batch regime restores"):
        MEMIT(regime="batch", eval_every=10)
    with pytest.raises(ValueError, match=r"expected eval_every >= 0"):
        ROME(regime="sequential", eval_every=-1)
    assert MEMIT(regime="consecutive", eval_every=10).hparams.eval_every == 10


def test_consecutive_batches_split_at_a_conflict_and_the_batch_regime_keeps_them_whole():
    from kelight.methods import MEMIT
    from kelight.types import EditCase, EditRequest

    def case(i: int, subject: str, target: str) -> EditCase:
        return EditCase(EditRequest(f"{subject} is in", subject, target, case_id=i))

    batch = [case(0, "Paris", "Spain"), case(1, "Rome", "Peru"), case(2, "Paris", "Chile"), case(3, "Oslo", "Mali")]
    groups = MEMIT(model_name="tiny:llama", regime="consecutive")._edit_groups(batch)
    ids = [[c.case_id for c in group] for group in groups]
    assert ids == [[0, 1], [2, 3]]  # the second rewrite of Paris starts the next joint edit
    assert len(MEMIT(model_name="tiny:llama", regime="batch")._edit_groups(batch)) == 1  # refused before editing


def _single_rows(tmp_path, batch_size: int, **options) -> tuple[list[dict], object]:
    import json

    from kelight.data.datamodule import EditDataModule
    from kelight.methods import ROME

    module = ROME(model_name="tiny:llama", regime="single", **options,
                  editor=RomeHParams(layer=1, steps=3, context_templates=[], mom2_adjustment=False))
    quiet_trainer(tmp_path).fit(module, datamodule=EditDataModule(path=None, batch_size=batch_size, limit=3))
    rows = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    return rows, module


@pytest.mark.parametrize("options", [{}, {"fluency": False, "eval_protocol": "both"}, {"eval_protocol": "wild"}],
                         ids=["fluency", "wild answers", "both"])
def test_single_regime_generations_replay_each_edit_on_its_own_rows(tmp_path, monkeypatch, options):
    """The single regime generates after the restore (fluency samples, wild answers), each case on its edit
    replayed on its rows: alone in its batch, the same texts (hence FL) and answers as generating on the edited
    model itself; across a loader batch, the same teacher-forced scores and wild answers, and the weights
    restored bit for bit."""
    import torch

    import kelight.methods.base

    one, module = _single_rows(tmp_path / "deferred", batch_size=1, **options)
    original = {name: p.detach().clone() for name, p in module.lm.named_parameters()}
    monkeypatch.setattr(kelight.methods.base, "linear_weight_changes", lambda *args: None)
    edited, _ = _single_rows(tmp_path / "edited", batch_size=1, **options)  # on the edited weights, case by case
    monkeypatch.undo()
    def without(rows, *keys):
        return [{k: v for k, v in row.items() if k not in ("edit_seconds", *keys)} for row in rows]

    assert all(("FL" in row) == options.get("fluency", True) for row in one)
    assert all(("wild" in row) == ("eval_protocol" in options) for row in one)
    assert without(one) == without(edited)
    three, module = _single_rows(tmp_path / "batch", batch_size=3, **options)
    assert without(three, "FL") == without(one, "FL")
    assert all(torch.equal(p, original[name]) for name, p in module.lm.named_parameters())
