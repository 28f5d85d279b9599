"""Each method's LightningModule takes its hyper-parameters as ``editor`` and builds its editor from them; bad
options and combinations are refused with their name. The registry maps every method name to its pieces."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kelight.editors.alphaedit import AlphaEditHParams, AlphaEditor
from kelight.editors.ft import FTHParams
from kelight.editors.memit import MemitEditor, MemitHParams, PmetEditor, PmetHParams, SpreadEditor
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.methods import FT, MEMIT, PMET, ROME, AlphaEdit
from kelight.methods.registry import METHODS, method, method_of_module
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError
from tests.trainers import quiet_trainer

TINY = {"model_name": "tiny:llama"}


def test_rome_hparams_reach_its_editor_and_sadr_restrains_after_the_edit_layer():
    hp = RomeHParams(
        layer=2,
        steps=7,
        lr=0.3,
        context_templates=[[3, 2]],
        mean_key_insertion=True,
        sadr_gamma=0.05,
        sadr_selective=False,
        early_stop_loss=0.1,
        early_stop_on="edit",
    )
    editor = ROME(**TINY, editor=hp).build_editor()
    assert isinstance(editor, RomeEditor) and editor.hp is hp
    assert hp.context_templates == ((3, 2),)  # lists from the CLI become the tuples the editor keeps
    (sadr,) = editor.extra_losses
    assert isinstance(sadr, SADR)
    assert (sadr.gamma, sadr.first_layer, sadr.selective) == (0.05, 3, False)  # drift after the edit layer
    assert ROME(**TINY).build_editor().extra_losses == () and FT(**TINY).build_editor().extra_losses == ()


@pytest.mark.parametrize(
    ("cls", "hparams", "editor_cls"), [(MEMIT, MemitHParams, MemitEditor), (PMET, PmetHParams, PmetEditor)]
)
def test_memit_and_pmet(cls, hparams, editor_cls):
    editor = cls(**TINY, editor=hparams(layers=[1, 2], mom2_update_weight=1400.0, sadr_gamma=0.08)).build_editor()
    assert type(editor) is editor_cls and editor.pmet == (cls is PMET)
    assert editor.hp.layers == (1, 2) and editor.hp.early_stop_on == "total"  # the reference's default
    assert editor.hp.context_templates == ((10, 5),)  # MEMIT's own default, not ROME's
    assert editor.extra_losses[0].first_layer == 3  # drift after the last edited layer
    with pytest.raises(EditInputError, match="PMET's value vector is the MLP output"):
        PmetHParams(value_at="block")


def test_alphaedit_keeps_memits_value_vectors_with_its_own_solve():
    editor = AlphaEdit(
        **TINY, editor=AlphaEditHParams(layers=[1, 2], nullspace_threshold=0.05, nullspace_l2=3.0, sadr_gamma=0.08)
    ).build_editor()
    assert isinstance(editor, AlphaEditor) and not editor.pmet
    assert (editor.hp.nullspace_threshold, editor.hp.nullspace_l2) == (0.05, 3.0)
    assert editor.hp.context_templates == ((10, 5),) and editor.extra_losses[0].first_layer == 3
    for options, match in (
        ({"nullspace_threshold": 0.0}, "nullspace_threshold to be a finite number > 0"),
        ({"nullspace_threshold": None}, "nullspace_threshold to be a finite number > 0"),
        ({"nullspace_l2": float("nan")}, "nullspace_l2 to be a finite number > 0"),
    ):
        with pytest.raises(EditInputError, match=match):
            AlphaEditHParams(**options)


def test_alphaedit_has_no_mom2_update_weight(capsys):
    """MEMIT's λ would be silently unused by AlphaEdit's solve: the CLI and the API name it as unknown."""
    from kelight.cli.main import main

    config = Path(__file__).resolve().parents[2] / "configs/smollm2/alphaedit.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.editor.mom2_update_weight", "1400", "--print_config"])
    assert exit_info.value.code == 2 and "mom2_update_weight" in capsys.readouterr().err
    with pytest.raises(EditInputError, match=r"unknown alphaedit option\(s\) \['mom2_update_weight'\]; valid"):
        method("alphaedit").build_hparams(mom2_update_weight=1400.0)


def test_ft_restrains_drift_after_its_layer():
    editor = FT(**TINY, editor=FTHParams(layer=1, norm_constraint=1e-3, sadr_gamma=0.02)).build_editor()
    assert editor.extra_losses[0].first_layer == 2


def test_z_batch_is_refused_where_edits_depend_on_each_other():
    with pytest.raises(EditInputError, match="in the sequential regime each edit's z must see the edits before"):
        ROME(**TINY, regime="sequential", editor=RomeHParams(z_batch=2))
    for regime in ("batch", "consecutive"):
        with pytest.raises(EditInputError, match=f"ROME's {regime} regime applies the requests in turn"):
            ROME(**TINY, regime=regime, editor=RomeHParams(z_batch=2))
    assert MEMIT(**TINY, regime="consecutive", editor=MemitHParams(z_batch=2)).z_batch == 2  # joint: independent
    with pytest.raises(
        EditInputError,
        match=r"expected regime to be one of \['single', 'batch', 'sequential', "
        r"'consecutive'\] for ROME, got 'seq'",
    ):
        ROME(**TINY, regime="seq")


@pytest.mark.parametrize("hparams", [RomeHParams, MemitHParams, FTHParams])
def test_bad_options_are_refused_where_the_hparams_are_built(hparams):
    for gamma in (-0.5, float("nan"), float("inf")):
        with pytest.raises(EditInputError, match="expected sadr_gamma to be a finite number ≥ 0.*use 0 to turn SADR"):
            hparams(sadr_gamma=gamma)
    for templates in ([[5, -2]], [[0, 2]], [[5]], [5, 10]):
        with pytest.raises(EditInputError, match=r"expected context_templates to be \[length, count\] pairs"):
            hparams(context_templates=templates)


@pytest.mark.parametrize(
    ("hparams", "options", "match"),
    [
        (RomeHParams, {"layer": True}, "expected layer to be one layer index"),
        (FTHParams, {"layer": [1]}, "expected layer to be one layer index.*MEMIT/PMET take layers"),
        (MemitHParams, {"layers": 1}, r"expected layers to be a list of layer indices.*one layer is written \[1\]"),
        (PmetHParams, {"layers": [2, 1]}, "non-empty ascending"),
        (RomeHParams, {"steps": 0}, "expected steps to be a positive integer"),
        (MemitHParams, {"mom2_n_tokens": 0}, "expected mom2_n_tokens to be an integer ≥ 1"),
    ],
)
def test_bad_layers_and_counts_are_refused(hparams, options, match):
    with pytest.raises(EditInputError, match=match):
        hparams(**options)


def test_the_registry_names_every_method_and_its_pieces():
    assert list(METHODS) == ["rome", "memit", "pmet", "alphaedit", "ft", "pathedit", "ultraedit"]
    for spec in METHODS.values():
        assert inspect.signature(spec.module.__init__).parameters["editor"].annotation in (
            spec.hparams,
            spec.hparams.__name__,
        )
        assert method(spec.name.upper()) is spec and method_of_module(spec.module) is spec
        assert method_of_module(f"kelight.{spec.module.__name__}") is spec
        assert isinstance(spec.build_hparams(), spec.hparams)
    with pytest.raises(EditInputError, match=r"unknown method 'romee'; expected one of \['rome', 'memit'"):
        method("romee")
    with pytest.raises(EditInputError, match=r"unknown rome option\(s\) \['layerz'\]; valid options: \[.*'layer'"):
        method("rome").build_hparams(layerz=3)
    with pytest.raises(EditInputError, match="is not the LightningModule of a kelight method"):
        method_of_module("kelight.EditModule")
    assert method("memit").build_hparams(layers=[1, 2], context_templates=[[3, 1]]).layers == (1, 2)


@pytest.mark.parametrize("regime", ["batch", "consecutive"])
def test_memit_batch_regime_refuses_a_conflict_before_the_first_edit(tmp_path, regime):
    """The conflict sits in the second loader batch: the batch regime stops before editing the first one; the
    consecutive regime (a stream) makes the conflicting request the start of the next joint edit."""
    import json

    from kelight.data.datamodule import EditDataModule
    from kelight.models.tiny import tiny_model

    def record(subject: str, prompt: str, new: str) -> dict:
        return {
            "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": new, "target_true": "X"},
            "rewrite": {"prompts": [prompt], "targets": [new]},
        }

    path = tmp_path / "cases.json"
    path.write_text(
        json.dumps(
            [
                record("Lyon", "Lyon is in", "Peru"),
                record("Oslo", "Oslo is in", "Chad"),
                record("Rome", "Rome is in", "Fiji"),
                record("Rome", "Rome is in", "Cuba"),
            ]
        )
    )
    module = MEMIT(
        model_name="tiny:llama",
        fluency=False,
        regime=regime,
        editor=MemitHParams(layers=[0, 1], steps=2, context_templates=[], mom2_corpus="model", mom2_n_tokens=200),
    )
    edits = []
    original = SpreadEditor.apply
    trainer = quiet_trainer(tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpreadEditor, "apply", lambda *a, **k: (edits.append(len(a[3])), original(*a, **k))[1])
        if regime == "consecutive":
            trainer.fit(module, datamodule=EditDataModule(path=str(path), batch_size=2))
            assert edits == [2, 1, 1] and module.final_metrics["n_cases"] == 4
        else:
            with pytest.raises(
                EditInputError,
                match=r"requests 0 and 1 \(cases 2, 3\) of one joint edit rewrite "
                r"the same prompt 'Rome is in' of subject 'Rome' to different",
            ):
                trainer.fit(module, datamodule=EditDataModule(path=str(path), batch_size=2))
            assert edits == []
    fresh, _ = tiny_model("llama")
    for (name, a), b in zip(module.lm.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert a.equal(b), name


def test_consecutive_regime_keeps_each_loader_batch_as_one_joint_edit(tmp_path):
    """AlphaEdit, 4 cases in loader batches of 2: two joint edits of 2, the second on the first's weights
    (K_p K_pᵀ holds the first batch's keys), all cases scored at the end, then the weights come back."""
    import torch

    from kelight.data.datamodule import EditDataModule

    module = AlphaEdit(
        model_name="tiny:llama",
        fluency=False,
        regime="consecutive",
        editor=AlphaEditHParams(
            layers=[0, 1],
            steps=2,
            context_templates=[],
            mom2_corpus="model",
            mom2_n_tokens=200,
            nullspace_threshold=1.0,
        ),
    )
    module.configure_model()
    snap = {k: v.clone() for k, v in module.lm.state_dict().items()}
    calls = []
    original = SpreadEditor.apply

    def spy(editor, model, tok, requests, undo, **kwargs):
        calls.append(
            (len(requests), len(undo), {k: torch.linalg.matrix_rank(g).item() for k, g in editor.edited_gram.items()})
        )
        return original(editor, model, tok, requests, undo, **kwargs)

    trainer = quiet_trainer(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpreadEditor, "apply", spy)
        trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=2, limit=4))
    assert calls == [(2, 0, {}), (2, 2, {0: 2, 1: 2})]  # the second joint edit sees the first's weights and keys
    assert module.final_metrics["n_cases"] == 4
    assert all(torch.equal(v, snap[k]) for k, v in module.lm.state_dict().items())  # restored when the fit ends
    assert module.editor.edited_gram == {}
