"""The method modules map their CLI arguments onto the editors' hyper-parameters and reject bad combinations."""

from __future__ import annotations

import pytest

from kelight.editors.memit import MemitEditor
from kelight.editors.rome import RomeEditor
from kelight.methods import FT, MEMIT, PMET, ROME, AlphaEdit
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError


def test_rome_arguments_reach_its_editor():
    editor = ROME(model_name="tiny:llama", layer=2, steps=7, lr=0.3, context_templates=[[3, 2]],
                  mean_key_insertion=True, sadr_gamma=0.05, sadr_selective=False, early_stop_loss=0.1,
                  early_stop_on="edit").build_editor()
    assert isinstance(editor, RomeEditor)
    assert (editor.hp.layer, editor.hp.z.steps, editor.hp.z.lr) == (2, 7, 0.3)
    assert (editor.hp.z.early_stop_loss, editor.hp.z.early_stop_on) == (0.1, "edit")
    assert editor.hp.context_templates == ((3, 2),) and editor.hp.mean_key_insertion
    (sadr,) = editor.extra_losses
    assert isinstance(sadr, SADR)
    assert (sadr.gamma, sadr.first_layer, sadr.selective) == (0.05, 3, False)  # drift after the edit layer


def test_sadr_is_absent_at_gamma_zero():
    assert ROME(model_name="tiny:llama").build_editor().extra_losses == ()
    assert FT(model_name="tiny:llama").build_editor().extra_losses == ()


@pytest.mark.parametrize(("cls", "pmet"), [(MEMIT, False), (PMET, True)])
def test_memit_and_pmet_share_one_editor(cls, pmet):
    editor = cls(model_name="tiny:llama", layers=[1, 2], mom2_update_weight=1400.0, value_at="mlp",
                 sadr_gamma=0.08).build_editor()
    assert isinstance(editor, MemitEditor)
    assert (editor.hp.layers, editor.hp.pmet, editor.hp.mom2_update_weight) == ((1, 2), pmet, 1400.0)
    assert editor.hp.value_at == "mlp" and editor.hp.z.early_stop_on == "total"  # the reference's default
    assert editor.hp.context_templates == ((10, 5),)  # MEMIT's own default, not ROME's
    assert editor.extra_losses[0].first_layer == 3  # drift after the last edited layer


def test_alphaedit_is_memit_with_the_nullspace_solve():
    editor = AlphaEdit(model_name="tiny:llama", layers=[1, 2], nullspace_threshold=0.05, nullspace_l2=3.0,
                       sadr_gamma=0.08).build_editor()
    assert isinstance(editor, MemitEditor) and not editor.hp.pmet
    assert (editor.hp.layers, editor.hp.nullspace_threshold, editor.hp.nullspace_l2) == ((1, 2), 0.05, 3.0)
    assert editor.hp.context_templates == ((10, 5),) and editor.extra_losses[0].first_layer == 3
    assert MEMIT(model_name="tiny:llama").build_editor().hp.nullspace_threshold is None  # MEMIT's own solve


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"nullspace_threshold": 0.0}, "nullspace_threshold to be a finite number > 0"),
    ({"nullspace_l2": float("nan")}, "nullspace_l2 to be a finite number > 0"),
])
def test_alphaedit_refuses_bad_solve_options(kwargs, match):
    with pytest.raises(EditInputError, match=match):
        AlphaEdit(model_name="tiny:llama", **kwargs)


def test_alphaedit_has_no_mom2_update_weight_on_the_cli(capsys):
    """MEMIT's λ would be silently unused by AlphaEdit's solve: the CLI names it as an unknown key."""
    from pathlib import Path

    from kelight.cli import main

    config = Path(__file__).resolve().parents[1] / "configs/smollm2/alphaedit.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.mom2_update_weight", "1400", "--print_config"])
    assert exit_info.value.code != 0
    assert "mom2_update_weight" in capsys.readouterr().err


def test_ft_measures_drift_after_its_layer():
    editor = FT(model_name="tiny:llama", layer=1, norm_constraint=1e-3, sadr_gamma=0.02).build_editor()
    assert (editor.hp.layer, editor.hp.norm_constraint) == (1, 1e-3)
    assert editor.extra_losses[0].first_layer == 2


def test_module_rejects_z_batch_where_edits_depend_on_each_other():
    with pytest.raises(ValueError, match="sequential"):
        ROME(model_name="tiny:llama", regime="sequential", z_batch=2)
    with pytest.raises(ValueError, match="in turn"):
        ROME(model_name="tiny:llama", regime="batch", z_batch=2).build_editor()
    with pytest.raises(ValueError, match="ROME's consecutive regime applies the requests in turn"):
        ROME(model_name="tiny:llama", regime="consecutive", z_batch=2).build_editor()
    assert MEMIT(model_name="tiny:llama", regime="consecutive", z_batch=2).build_editor().hp.z.z_batch == 2  # joint
    with pytest.raises(ValueError, match="expected regime 'single', 'batch', 'sequential' or 'consecutive', got 'seq'"):
        ROME(model_name="tiny:llama", regime="seq")


def test_compile_reaches_the_z_config():
    assert MEMIT(model_name="tiny:llama", layers=[1, 2], compile="default").build_editor().hp.z.compile == "default"
    assert ROME(model_name="tiny:llama").build_editor().hp.z.compile == "off"


@pytest.mark.parametrize("cls", [ROME, MEMIT, FT])
@pytest.mark.parametrize("gamma", [-0.5, float("nan"), float("inf")])
def test_bad_sadr_gamma_is_refused_not_turned_off(cls, gamma):
    with pytest.raises(EditInputError, match="expected sadr_gamma to be a finite number ≥ 0.*use 0 to turn SADR off"):
        cls(model_name="tiny:llama", sadr_gamma=gamma).build_editor()


@pytest.mark.parametrize("cls", [ROME, MEMIT, FT])
@pytest.mark.parametrize("templates", [[[5, -2]], [[0, 2]], [[5]], [5, 10]])
def test_bad_context_templates_are_refused(cls, templates):
    with pytest.raises(EditInputError, match=r"expected context_templates to be \[length, count\] pairs"):
        cls(model_name="tiny:llama", context_templates=templates).build_editor()


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (ROME, {"layer": True}, "expected layer to be one layer index"),
    (FT, {"layer": [1]}, "expected layer to be one layer index.*MEMIT/PMET take layers"),
    (MEMIT, {"layers": 1}, r"expected layers to be a list of layer indices.*one layer is written \[1\]"),
    (PMET, {"layers": [2, 1]}, "non-empty ascending"),
])
def test_bad_layers_are_refused(cls, kwargs, match):
    with pytest.raises(EditInputError, match=match):
        cls(model_name="tiny:llama", **kwargs).build_editor()


@pytest.mark.parametrize("regime", ["batch", "consecutive"])
def test_memit_batch_regime_refuses_a_conflict_before_the_first_edit(tmp_path, regime):
    """The conflict sits in the second loader batch: the batch regime stops before editing the first one; the
    consecutive regime (a stream) makes the conflicting request the start of the next joint edit."""
    import json

    import lightning as L

    from kelight.data.datamodule import EditDataModule
    from kelight.models.tiny import tiny_model

    def record(subject: str, prompt: str, new: str) -> dict:
        return {"requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": new, "target_true": "X"},
                "rewrite": {"prompts": [prompt], "targets": [new]}}

    path = tmp_path / "cases.json"
    path.write_text(json.dumps([record("Lyon", "Lyon is in", "Peru"), record("Oslo", "Oslo is in", "Chad"),
                                record("Rome", "Rome is in", "Fiji"), record("Rome", "Rome is in", "Cuba")]))
    module = MEMIT(model_name="tiny:llama", layers=[0, 1], steps=2, context_templates=[], mom2_corpus="model",
                   mom2_n_tokens=200, fluency=False, regime=regime)
    edits = []
    original = MemitEditor.apply
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path / "run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemitEditor, "apply", lambda *a, **k: (edits.append(len(a[3])), original(*a, **k))[1])
        if regime == "consecutive":
            trainer.fit(module, datamodule=EditDataModule(path=str(path), batch_size=2))
            assert edits == [2, 1, 1] and module.final_metrics["n_cases"] == 4
        else:
            with pytest.raises(EditInputError, match=r"requests 0 and 1 \(cases 2, 3\) of one joint edit rewrite "
                                                     r"the same prompt 'Rome is in' of subject 'Rome' to different"):
                trainer.fit(module, datamodule=EditDataModule(path=str(path), batch_size=2))
            assert edits == []
    fresh, _ = tiny_model("llama")
    for (name, a), b in zip(module.lm.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert a.equal(b), name


def test_consecutive_regime_keeps_each_loader_batch_as_one_joint_edit(tmp_path):
    """AlphaEdit, 4 cases in loader batches of 2: two joint edits of 2, the second on the first's weights
    (K_p K_pᵀ holds the first batch's keys), all cases scored at the end, then the weights come back."""
    import lightning as L
    import torch

    from kelight.data.datamodule import EditDataModule

    module = AlphaEdit(model_name="tiny:llama", layers=[0, 1], steps=2, context_templates=[], mom2_corpus="model",
                       mom2_n_tokens=200, nullspace_threshold=1.0, fluency=False, regime="consecutive")
    module.configure_model()
    snap = {k: v.clone() for k, v in module.lm.state_dict().items()}
    calls = []
    original = MemitEditor.apply

    def spy(editor, model, tok, requests, undo, **kwargs):
        calls.append((len(requests), len(undo), {k: torch.linalg.matrix_rank(g).item()
                                                 for k, g in editor.edited_gram.items()}))
        return original(editor, model, tok, requests, undo, **kwargs)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemitEditor, "apply", spy)
        trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=2, limit=4))
    assert calls == [(2, 0, {}), (2, 2, {0: 2, 1: 2})]  # the second joint edit sees the first's weights and keys
    assert module.final_metrics["n_cases"] == 4
    assert all(torch.equal(v, snap[k]) for k, v in module.lm.state_dict().items())  # restored when the fit ends
    assert module.editor.edited_gram == {}
