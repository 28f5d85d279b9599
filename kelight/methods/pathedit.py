"""PathEdit as a LightningModule: its options are ``--model.editor.*`` (:class:`~kelight.editors.pathedit.PathHParams`).

Regimes: the four every method takes (``single``, ``batch``, ``sequential``, ``consecutive``: an edit is one
request, or one loader batch trained jointly, each traced and trained for ``epochs`` steps, then evaluated and
undone or kept), and PAC's own:

``joint`` (the default, PAC's setting)
    Lightning's own loop, automatic optimisation: one epoch = one pass over the edit set in batches
    of ``--data.batch_size`` requests (PAC: 2), in a fresh seeded order each epoch as in PAC
    (``--model.editor.reshuffle false``: the loader's batches every epoch); ``epochs`` epochs (PAC: 12; the
    module sets the trainer's ``max_epochs`` to it, the CLI default of 1 being meant for one-pass
    editors). The only parameters given to Adam are the path deltas. Paths are traced over the
    whole set on the unedited model before epoch 0 and re-traced every ``eta`` epochs. At the end
    the deltas are written into the weights, every case is evaluated, and the weights are restored
    (bit-exact) when the fit ends.

The other regimes run PathEdit's inner loop inside one ``training_step`` (a Trainer per edit would cost more
than the edit: docs/design.md, "The edit loop"); its contrastive targets are the model's argmax before that
edit (in the keeping regimes that model holds the earlier edits). The outputs are the run's contract
(docs/design.md, "The output contract") plus ``path_importance.png``/``.json`` (the critical path's impact
scores, layer × rank, PAC Figure 4).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Literal

import torch

from kelight.analysis.path_importance import save_path_importance
from kelight.editors.pathedit import PathEditor, PathHParams, build_path_batch
from kelight.methods.base import REGIMES, EditModule
from kelight.types import EditCase, EditInputError, check_joint_requests

log = logging.getLogger(__name__)
PathRegime = Literal["joint", "single", "batch", "sequential", "consecutive"]


def _key(cases: list[EditCase]) -> tuple:
    return tuple(case.case_id for case in cases)


def epoch_batches(n_cases: int, batch_size: int, epochs: int, seed: int | None) -> list[list[list[int]]]:
    """Case indices of every loader batch of every epoch: ``[epoch][batch] -> indices``.

    ``seed`` ``None`` keeps the loader's order every epoch; otherwise each epoch is a fresh seeded
    permutation cut into batches of ``batch_size`` (PAC reshuffles its edit set every epoch).

    >>> epoch_batches(5, 2, 1, None)
    [[[0, 1], [2, 3], [4]]]
    >>> [sorted(i for b in epoch for i in b) for epoch in epoch_batches(5, 2, 3, seed=0)]
    [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    """
    if n_cases < 1 or batch_size < 1 or epochs < 1:
        raise EditInputError(f"expected positive n_cases, batch_size and epochs, got {n_cases}, {batch_size}, {epochs}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = []
    for _ in range(epochs):
        order = torch.randperm(n_cases, generator=generator).tolist() if generator else list(range(n_cases))
        out.append([order[i : i + batch_size] for i in range(0, n_cases, batch_size)])
    return out


class PathEdit(EditModule):
    """PathEdit (PAC, Zhai et al. ACL 2025): critical paths across all layers + contrastive rectification.

    Args:
        editor: PathEdit's hyper-parameters.
        regime: ``joint`` (PAC's whole-set training, the default) or one of the four every method takes.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    REGIMES = (*REGIMES, "joint")
    JOINT = True

    def __init__(self, editor: PathHParams = PathHParams(), regime: PathRegime = "joint",  # noqa: B008
                 **kwargs) -> None:
        super().__init__(regime=regime, **kwargs)
        self.save_hyperparameters()
        if self.hparams.resume and regime == "joint":
            raise EditInputError("resume continues a run whose cases were edited one batch at a time, but the joint "
                                 "regime trains one set of path deltas on every case at once: run it again without "
                                 "--model.resume")
        self.automatic_optimization = regime == "joint"
        self.path_deltas = None  # the only trainable parameters, registered in configure_model
        self._stack = ExitStack()

    @property
    def joint_regime(self) -> bool:
        return self.hparams.regime == "joint"

    # ---- model, editor, optimiser ----------------------------------------------------
    def build_editor(self) -> PathEditor:
        return PathEditor(self.hparams.editor)

    def configure_model(self) -> None:
        super().configure_model()
        if self.editor is None:  # before configure_optimizers, which needs the deltas
            self.editor = self.build_editor()
            self.editor.setup(self.lm, self.tok)
            self.path_deltas = self.editor.deltas

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.joint_regime and self.trainer.world_size > 1:
            raise EditInputError(
                f"PathEdit's joint regime trains one set of path deltas on the whole edit set, but "
                f"{self.trainer.world_size} processes would each train on their own shard (the edit "
                f"strategy shares no gradients); run it on one device (--trainer.devices 1), or use "
                f"--model.regime single or batch to shard independent edits across devices"
            )
        if stage == "fit":
            epochs = self.hparams.editor.epochs if self.joint_regime else 1
            if self.trainer.max_epochs not in (1, epochs):
                log.info("PathEdit runs %d epoch(s) (--model.editor.epochs); ignoring trainer.max_epochs=%s",
                         epochs, self.trainer.max_epochs)
            self.trainer.fit_loop.max_epochs = epochs

    def configure_optimizers(self):
        if not self.joint_regime:
            return None  # per-batch regimes: a fresh Adam per edit inside PathEditor.apply
        return torch.optim.Adam(self.path_deltas.parameters(), lr=self.hparams.editor.lr)

    def on_fit_start(self) -> None:
        self.editor.traces.clear()
        self._reset_run()

    # ---- joint regime: Lightning's loop ----------------------------------------------
    def on_train_start(self) -> None:
        if self.joint_regime:
            self._guarded(self._prepare_batches)
        else:
            super().on_train_start()

    def _prepare_batches(self) -> None:
        """Pre-edit references of every batch of every epoch (on the unedited model): locality,
        contrastive targets, SADR attention."""
        self._t0 = time.perf_counter()
        loader_batches = [list(b) for b in self.trainer.train_dataloader]
        self._cases = [case for b in loader_batches for case in b]
        check_joint_requests([case.request for case in self._cases])  # one set of deltas holds every edit
        self._record_unedited_locality(self._cases)
        device = self.path_deltas.key_pos.device
        seed = self.hparams.editor.shuffle_seed if self.hparams.editor.reshuffle else None
        epochs = [[[self._cases[i] for i in b] for b in epoch] for epoch in epoch_batches(
            len(self._cases), len(loader_batches[0]), self.hparams.editor.epochs, seed)]
        self._epoch_keys = [[_key(b) for b in epoch] for epoch in epochs]
        self._batches = {}  # one per distinct batch (without reshuffling, every epoch's are the same)
        for b in (b for epoch in epochs for b in epoch):
            if _key(b) not in self._batches:
                self._batches[_key(b)] = build_path_batch(self.tok, [c.request for c in b], device)
        self._refs = {k: self.editor.reference_ids(self.lm, b) for k, b in self._batches.items()}
        self._sadr = {k: self.hparams.editor.sadr(1) for k in self._batches}  # one term per batch: its own vanilla
        self._stack.enter_context(self.editor.deltas.attached(self.lm, self.editor.adapter))
        for key, terms in self._sadr.items():
            self.editor.prime(self.lm, self._batches[key], terms)  # SADR: the unedited model's attention

    def on_train_epoch_start(self) -> None:
        if self.joint_regime and self.current_epoch % self.hparams.editor.eta == 0:
            self._guarded(lambda: self.editor.retrace(  # over this epoch's batches: the whole edit set once
                self.lm, [self._batches[k] for k in self._epoch_keys[self.current_epoch]], (self.undo,),
                self.trainer.optimizers[0], first=self.current_epoch == 0))

    def training_step(self, batch: list[EditCase], batch_idx: int):
        if not self.joint_regime:
            return super().training_step(batch, batch_idx)
        if not batch:
            return None  # an empty padding slot (no step)
        key = self._epoch_keys[self.current_epoch][batch_idx]  # this epoch's order (the loader's if not reshuffled)
        if len(key) != len(batch):
            raise RuntimeError(f"loader batch {batch_idx} has {len(batch)} cases but this epoch's batch has "
                               f"{len(key)}; the edit set changed after training started")
        loss = self._guarded(lambda: self.editor.loss(
            self.lm, self._batches[key], self._refs[key], self._sadr[key], step=self.global_step + 1))
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=len(batch))
        return loss

    def on_train_epoch_end(self) -> None:
        if not self.joint_regime:
            super().on_train_epoch_end()  # evaluates the kept edits and writes the contract
            self._save_importance()

    def on_train_end(self) -> None:
        if not self.joint_regime:
            return
        self._guarded(lambda: self.editor.deltas.fold_into(self.lm, self.editor.adapter, (self.undo,)))
        self._stack.close()  # hooks off, attention back: evaluate the edited weights themselves
        seconds = (time.perf_counter() - self._t0) / len(self._cases)  # tracing + training, per edit
        self.edit_seconds = [seconds] * len(self._cases)
        ppl = self._perplexity()
        with self._generations_for(self._cases):
            for case in self._cases:
                self._record(case, self._evaluate(case, self._unedited_locality[case.case_id], ppl), seconds)
        self._finish("fit")
        self._save_importance()

    def _guarded(self, fn):
        """Run ``fn``; on any error remove the hooks and restore the weights before re-raising."""
        try:
            return fn()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Hooks off, this fit's edits undone (bit-exact), unfolded deltas dropped."""
        self._stack.close()
        if self.editor is not None and self.editor.deltas is not None:
            self.editor.deltas.discard()
        super()._abort()

    def _save_importance(self) -> None:
        if self.editor.traces and self.trainer.is_global_zero:
            out = self.out_dir or self.trainer.default_root_dir  # the run directory
            save_path_importance(out, self.editor.traces,
                                 title=f"PathEdit critical path, {self.hparams.model_name}")
