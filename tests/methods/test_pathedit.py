"""PathEdit as a LightningModule: the CLI writes the contract in every regime, Lightning trains
only the path deltas, masked weights stay bit-identical, errors and the end of fit restore."""

import doctest
import json
from pathlib import Path

import lightning as L
import pytest
import torch

import kelight.methods.pathedit
from kelight.analysis.path_importance import ranked_importance, save_path_importance
from kelight.cli.main import run
from kelight.data import EditDataModule
from kelight.editors.pac.deltas import PathSelection
from kelight.editors.pac.trace import select_paths
from kelight.editors.pathedit import PathHParams
from kelight.methods.pathedit import PathEdit
from kelight.models.tiny import tiny_model
from tests.conftest import COUNTERFACT_EDIT_CASES as DATA
from tests.trainers import quiet_trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--model.model_name",
    "tiny:llama",
    "--model.editor.path_size",
    "4",
    "--model.editor.lr",
    "0.01",
    "--model.editor.epochs",
    "4",
    "--model.fluency",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(DATA))
    return path


def _assert_unedited(model):
    fresh, _ = tiny_model("llama")  # same seed: the run must end with the unedited weights
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("pathedit.yaml", ["--data.batch_size", "2"]),
        ("pathedit_sadr.yaml", ["--model.regime", "consecutive", "--data.batch_size", "1"]),
        ("pathedit_sadr.yaml", ["--data.batch_size", "2"]),  # joint regime: SADR primed once per batch
        ("pathedit.yaml", ["--model.regime", "single", "--data.batch_size", "1"]),
    ],
)
def test_cli_fit_writes_contract_and_restores(tmp_path, config, extra):
    out = tmp_path / "run"
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/smollm2" / config),
            *TINY,
            *extra,
            "--data.path",
            str(_data(tmp_path)),
            "--data.format",
            "counterfact_edit",
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 3 and metrics["seconds_per_edit"] > 0
    for key in ("Efficacy", "Generality", "Locality", "Score", "ES", "PS", "NS"):
        assert key in metrics
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert (out / "path_importance.png").stat().st_size > 0
    importance = json.loads((out / "path_importance.json").read_text())
    assert importance["n_layers"] == 3 and importance["path_size"] == 4
    expected_epochs = 4 if cli.model.hparams.regime == "joint" else 1
    assert cli.trainer.current_epoch == expected_epochs
    _assert_unedited(cli.model.lm)


class _FoldedWeights(L.Callback):
    """Copies the weights after training, before the module restores them (callbacks run first)."""

    def on_fit_end(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.lm.state_dict().items()}


def _fit(module, out_dir, callbacks=(), batch_size=2):
    data = EditDataModule(path=None, batch_size=batch_size, limit=4)
    trainer = quiet_trainer(out_dir, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


def _module(regime="joint", **options):
    """A PathEdit module on the tiny model; ``options`` override its small hyper-parameters."""
    hparams = PathHParams(**{"path_size": 4, "epochs": 4, "lr": 1e-2, **options})
    return PathEdit(model_name="tiny:llama", fluency=False, regime=regime, editor=hparams)


def test_lightning_trains_only_path_deltas_and_masked_weights_stay(tmp_path, monkeypatch):
    module = _module(eta=2)
    selections = []
    original = None

    def spy(*args, **kwargs):
        selections.append(original(*args, **kwargs))
        return selections[-1]

    module.configure_model()
    original = module.editor.retrace
    monkeypatch.setattr(module.editor, "retrace", spy)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("path_deltas.") for n in trainable)
    fresh, _ = tiny_model("llama")
    folded = _FoldedWeights()
    trainer = _fit(module, tmp_path, [folded])
    assert len(selections) == 2 and trainer.current_epoch == 4  # tracings at epochs 0 and 2
    edited = folded.weights
    adapter = module.editor.adapter
    for name, original_weight in fresh.state_dict().items():
        if not any(name == f"{adapter.path(w, layer)}.weight" for layer in range(3) for w in ("mlp_in", "mlp_out")):
            assert torch.equal(edited[name], original_weight), name
    for layer in range(3):
        for kind, which, dim in (("key", "mlp_in", 0), ("value", "mlp_out", 1)):
            name = f"{adapter.path(which, layer)}.weight"
            touched = set().union(
                *(
                    set(getattr(s, f"{kind}_pos")[layer].tolist()) | set(getattr(s, f"{kind}_neg")[layer].tolist())
                    for s in selections
                )
            )
            keep = torch.tensor(sorted(set(range(96)) - touched))
            a, b = adapter.as_linear(edited[name]), adapter.as_linear(fresh.state_dict()[name])
            assert torch.equal(a.index_select(dim, keep), b.index_select(dim, keep)), name
            assert not torch.equal(a, b), name  # the path itself was edited
    _assert_unedited(module.lm)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_cases"] == 4  # the built-in demo set


def test_divergence_in_lightning_loop_restores(tmp_path):
    module = _module(lr=1e30, eta=1)
    with pytest.raises(FloatingPointError, match="diverged|NaN/inf"):
        _fit(module, tmp_path)
    _assert_unedited(module.lm)
    assert all(not m._forward_hooks for m in module.lm.modules())


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="path_size"):
        PathEdit(model_name="tiny:llama", editor=PathHParams(path_size=0))
    for gamma in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="expected sadr_gamma to be a finite number ≥ 0"):
            PathEdit(model_name="tiny:llama", editor=PathHParams(sadr_gamma=gamma))
    with pytest.raises(ValueError, match="regime"):
        PathEdit(model_name="tiny:llama", regime="sometimes")
    with pytest.raises(ValueError, match="reshuffle"):
        PathEdit(model_name="tiny:llama", editor=PathHParams(reshuffle="yes"))
    with pytest.raises(ValueError, match="shuffle_seed"):
        PathEdit(model_name="tiny:llama", editor=PathHParams(shuffle_seed=-1))
    module = PathEdit(model_name="tiny:llama", editor=PathHParams(path_size=96))
    with pytest.raises(ValueError, match="exceeds the FFN width"):
        module.configure_model()


def test_path_importance_plot(tmp_path):
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    pos, neg = select_paths(scores, 4, 1)
    selection = PathSelection(pos, neg, pos, neg, scores, scores * 2)
    ranked = ranked_importance([selection, selection])
    assert ranked["key"].shape == (3, 4) and torch.all(ranked["key"][:, :-1] >= ranked["key"][:, 1:])
    png, js = save_path_importance(tmp_path, [selection], title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(js.read_text())
    assert payload["key_index"] == pos.tolist()
    torch.testing.assert_close(torch.tensor(payload["value_scores"]), 2 * ranked["key"])
    with pytest.raises(ValueError, match="at least one path tracing"):
        ranked_importance([])


def test_joint_regime_refuses_several_processes():
    from types import SimpleNamespace

    module = PathEdit(model_name="tiny:llama", regime="joint")
    module._trainer = SimpleNamespace(world_size=2, max_epochs=1)
    with pytest.raises(ValueError, match="--trainer.devices 1"):
        module.setup("fit")


@pytest.mark.parametrize(
    ("regime", "sizes"),
    [
        ("consecutive", [2, 2]),  # 4 cases, loader batches of 2: two joint edits
        ("batch", [2, 2]),
        ("single", [1, 1, 1, 1]),  # the per-case regimes edit each case alone, whatever the loader batch
        ("sequential", [1, 1, 1, 1]),
    ],
)
def test_per_batch_regimes_edit_each_loader_batch_jointly(tmp_path, monkeypatch, regime, sizes):
    module = _module(regime=regime)
    module.configure_model()
    calls = []
    original = module.editor.apply

    def spy(model, tok, requests, undo):
        calls.append([r.subject for r in requests])
        return original(model, tok, requests, undo)

    monkeypatch.setattr(module.editor, "apply", spy)
    _fit(module, tmp_path, batch_size=2)
    assert [len(c) for c in calls] == sizes
    assert len({s for c in calls for s in c}) == 4
    _assert_unedited(module.lm)


def test_epoch_batches_cover_the_set_each_epoch():
    from kelight.methods.pathedit import epoch_batches

    fixed = epoch_batches(7, 3, 4, seed=None)
    assert fixed == [[[0, 1, 2], [3, 4, 5], [6]]] * 4
    shuffled = epoch_batches(7, 3, 4, seed=0)
    assert shuffled == epoch_batches(7, 3, 4, seed=0)  # seeded: reproducible
    for epoch in shuffled:
        assert [len(b) for b in epoch] == [3, 3, 1] and sorted(i for b in epoch for i in b) == list(range(7))
    assert len({tuple(map(tuple, epoch)) for epoch in shuffled}) > 1  # the order changes between epochs
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(7, 0, 4, seed=0)
    assert doctest.testmod(kelight.methods.pathedit, raise_on_error=True).failed == 0


@pytest.mark.parametrize("reshuffle", [True, False])
def test_joint_regime_trains_on_each_epochs_batches(tmp_path, monkeypatch, reshuffle):
    module = _module(reshuffle=reshuffle, shuffle_seed=3)
    module.configure_model()
    seen = []
    original = module.editor.loss

    def spy(model, batch, *args, **kwargs):
        seen.append(next(k for k, b in module._batches.items() if b is batch))
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(module.editor, "loss", spy)
    _fit(module, tmp_path, batch_size=2)
    assert seen == [key for epoch in module._epoch_keys for key in epoch]  # 4 epochs × 2 batches
    epochs = [sorted(i for key in epoch for i in key) for epoch in module._epoch_keys]
    assert len(module._epoch_keys) == 4 and all(e == epochs[0] for e in epochs)  # every case once per epoch
    compositions = {frozenset(key) for key in seen}
    assert (len(compositions) > 2) == reshuffle  # fixed: the loader's two batches; reshuffled: new pairs
    _assert_unedited(module.lm)


def test_joint_regime_refuses_conflicting_edits_in_different_loader_batches(tmp_path):
    """One set of path deltas holds every edit of the joint regime, so two cases that rewrite one prompt to
    different targets conflict even when the loader puts them in different batches."""
    conflicting = [*DATA, {**DATA[0], "case_id": 99, "target_new": DATA[0]["target_new"] + " Junior"}]
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(conflicting))
    module = _module()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    with pytest.raises(
        ValueError,
        match=r"requests 0 and 3 \(cases 0, 99\) of one joint edit rewrite the same "
        r"prompt .* to different targets",
    ):
        trainer.fit(module, datamodule=EditDataModule(path=str(path), format="counterfact_edit", batch_size=1))
    _assert_unedited(module.lm)


class _FailInBackward(L.Callback):
    """Raises in Lightning's own backward (e.g. out of memory), outside the module's hooks, after the
    tracing of epoch 2 has folded the first deltas into the weights."""

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.current_epoch == 2:
            raise RuntimeError("out of memory in backward")


def test_failure_outside_the_modules_hooks_restores_and_removes_hooks(tmp_path):
    module = _module(eta=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        _fit(module, tmp_path, [_FailInBackward()])
    assert all(not m._forward_hooks for m in module.lm.modules())
    _assert_unedited(module.lm)
    assert not module.editor.deltas.selected and all(not p.any() for p in module.path_deltas.parameters())
