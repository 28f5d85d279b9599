"""LightningModules: one ``training_step`` = one batch of edit cases (DESIGN §2).

The z optimisation is a manual inner loop (``automatic_optimization = False``); a fresh z and
optimiser per edit. Regimes: ``single`` restores the weights (bit-exact) after evaluating each
case; ``sequential`` keeps every edit and evaluates all cases at the end (optionally every N
edits), then restores the model when the fit ends.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.update import UndoLog
from kelight.editors.zopt import ZConfig
from kelight.evaluation import case_summary, evaluate_case, locality_reference
from kelight.metrics import EditMetrics
from kelight.models.loading import load
from kelight.objectives.sadr import sadr_terms
from kelight.results import format_table, write_results
from kelight.types import EditCase

log = logging.getLogger(__name__)
Regime = Literal["single", "sequential"]


class EditModule(L.LightningModule):
    """Shared experiment loop over edit cases; subclasses provide ``build_editor``.

    Args:
        model_name: ``"smollm2-135m"``, ``"gemma3-270m"``, or a Hugging Face id/path.
        dtype: parameter dtype of the edited model.
        regime: ``single`` (restore after each case) or ``sequential`` (keep all edits).
        eval_every: in the sequential regime, also evaluate the cases edited so far every N edits.
        fluency: generate from the case's generation prompts and report n-gram entropy (FL).
        attn_implementation: e.g. ``"eager"``; ``None`` keeps the model default.
    """

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        dtype: str = "float32",
        regime: Regime = "single",
        eval_every: int = 0,
        fluency: bool = True,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        if regime not in ("single", "sequential"):
            raise ValueError(f"expected regime 'single' or 'sequential', got {regime!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.lm = None
        self.tok = None
        self.editor = None
        self.undo = UndoLog()
        self.metrics = EditMetrics()
        self.case_rows: list[dict] = []
        self.edit_seconds: list[float] = []

    # ---- model and editor -------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is None:
            self.lm, self.tok = load(
                self.hparams.model_name, dtype=self.hparams.dtype, device="cpu",
                attn_implementation=self.hparams.attn_implementation,
            )

    def build_editor(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def configure_optimizers(self) -> None:
        return None  # z and its optimiser are created per edit inside the editor

    def on_fit_start(self) -> None:
        self.editor = self.build_editor()
        self.editor.setup(self.lm, self.tok)
        self._reset_run()

    def _reset_run(self) -> None:
        self.metrics.reset()
        self.case_rows, self.edit_seconds = [], []

    # ---- fit: edit + evaluate ---------------------------------------------------------
    def training_step(self, batch: list[EditCase], batch_idx: int) -> None:
        for case in batch:
            self._edit_case(case)
        every = self.hparams.eval_every
        if self.hparams.regime == "sequential" and every and len(self.edit_seconds) % every == 0:
            done = self.trainer.datamodule.cases[: len(self.edit_seconds)]
            partial = self._evaluate_all(done, EditMetrics().to(self.device))
            self.log_dict({f"seq/{k}": v for k, v in partial.items()}, on_step=True)

    def _edit_case(self, case: EditCase) -> None:
        pre = locality_reference(self.lm, self.tok, case)
        t0 = time.perf_counter()
        try:
            info = self.editor.apply(self.lm, self.tok, [case.request], self.undo)
        except Exception:
            self.undo.restore()  # never leave a half-edited model behind
            raise
        seconds = time.perf_counter() - t0
        self.edit_seconds.append(seconds)
        self.log("edit/seconds", seconds, on_step=True, batch_size=1)
        self.log("edit/z_steps", float(info.z[-1].steps_run), on_step=True, batch_size=1)
        self.log("edit/final_loss", info.z[-1].losses[-1], on_step=True, batch_size=1)
        if self.hparams.regime == "single":
            try:
                self._record(case, evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency,
                                                 pre_locality=pre), seconds)
            finally:
                self.undo.restore()
        else:
            self.case_rows.append({"id": case.case_id, "edit_seconds": seconds, "pre_locality": pre})

    def _record(self, case: EditCase, result, seconds: float | None) -> None:
        self.metrics.update(result)
        row = {"id": case.case_id, "source": case.source, **case_summary(result)}
        if seconds is not None:
            row["edit_seconds"] = seconds
        self.case_rows.append(row)

    def _evaluate_all(self, cases: list[EditCase], metrics: EditMetrics) -> dict[str, float]:
        for case in cases:
            metrics.update(evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency))
        return metrics.compute()

    def on_train_epoch_end(self) -> None:
        if self.hparams.regime == "sequential":
            pending, self.case_rows = self.case_rows, []
            cases = self.trainer.datamodule.cases[: len(pending)]
            for case, row in zip(cases, pending, strict=True):
                result = evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency,
                                       pre_locality=row["pre_locality"])
                self._record(case, result, row["edit_seconds"])
        self._finish("fit")

    def on_fit_end(self) -> None:
        self.undo.restore()  # sequential: the in-memory model returns to the unedited weights

    # ---- validate: the unedited model -------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._reset_run()

    def validation_step(self, batch: list[EditCase], batch_idx: int) -> None:
        if self.trainer.state.fn != "validate":
            return  # during fit, editing cases is the whole job; no extra evaluation pass
        for case in batch:
            self._record(case, evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency), None)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "validate":
            self._finish("validate")

    # ---- output contract --------------------------------------------------------------
    def _finish(self, stage: str) -> None:
        values = self.metrics.compute()
        values["n_cases"] = float(len(self.case_rows))
        if self.edit_seconds:
            values["seconds_per_edit"] = sum(self.edit_seconds) / len(self.edit_seconds)
        if self.logger is not None:
            self.logger.log_metrics({f"{stage}/{k}": v for k, v in values.items()}, step=self.global_step)
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir)
            path = write_results(out, values, self.case_rows)
            log.info("wrote %s\n%s", path, format_table({stage: values}))
        self.final_metrics = values


class ROME(EditModule):
    """ROME (Meng et al. 2022) as a LightningModule; every argument is a CLI/sweep key.

    Args:
        layer: edit layer.
        steps: z optimisation steps.
        lr: Adam learning rate of z.
        kl_factor: ω of the essence KL.
        weight_decay: weight of ‖δ‖/‖v‖².
        clamp_norm_factor: ‖δ‖ ≤ factor·‖v‖.
        context_templates: ``[length, count]`` pairs of sampled prefixes (ROME: [[5,10],[10,10]]).
        mom2_adjustment: use the key second moment C.
        mom2_n_tokens: corpus tokens for C.
        mom2_corpus: corpus for C (None: WikiText-2 in the shared data, else model samples).
        sadr_gamma: γ of the SADR attention-drift term (0 = off).
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        layer: int = 4,
        steps: int = 20,
        lr: float = 0.5,
        kl_factor: float = 0.0625,
        weight_decay: float = 1e-3,
        clamp_norm_factor: float = 4.0,
        context_templates: list[list[int]] = [[5, 10], [10, 10]],  # noqa: B006 (CLI default)
        mom2_adjustment: bool = True,
        mom2_n_tokens: int = 100_000,
        mom2_corpus: str | None = None,
        sadr_gamma: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def rome_hparams(self) -> RomeHParams:
        h = self.hparams
        z = ZConfig(steps=h.steps, lr=h.lr, kl_factor=h.kl_factor, weight_decay=h.weight_decay,
                    clamp_norm_factor=h.clamp_norm_factor)
        return RomeHParams(
            layer=h.layer, z=z, context_templates=tuple(tuple(x) for x in h.context_templates),
            mom2_adjustment=h.mom2_adjustment, mom2_n_tokens=h.mom2_n_tokens, mom2_corpus=h.mom2_corpus,
        )

    def build_editor(self) -> RomeEditor:
        return RomeEditor(self.rome_hparams(), sadr_terms(self.hparams.sadr_gamma, self.hparams.layer + 1))

