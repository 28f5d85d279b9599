"""LightningModules: one ``training_step`` = one batch of edit cases (DESIGN §2).

The z optimisation is a manual inner loop (``automatic_optimization = False``); a fresh z and
optimiser per edit. Regimes: ``single`` restores the weights (bit-exact) after evaluating each
case; ``batch`` edits a loader batch jointly (MEMIT/PMET; ROME applies them in turn), evaluates
and restores; ``sequential`` keeps every edit and evaluates all cases at the end (optionally every N
edits), then restores the model when the fit ends. Locality always compares against the unedited
model's predictions (recorded before the first edit in the sequential regime), as EasyEdit and PAC do.

Several processes (``--trainer.devices N --trainer.strategy ddp``, :mod:`kelight.distributed`) each
edit their own shard of the cases; the metrics, ``n_cases``, ``seconds_per_edit`` and ``cases.jsonl``
cover every case exactly once. The sequential regime is then sequential per shard: each process
keeps only its own edits (N independent edit sequences, not one).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from kelight.distributed import gather_objects, interleave
from kelight.editors.ft import FTEditor, FTHParams
from kelight.editors.memit import MemitEditor, MemitHParams
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.update import UndoLog
from kelight.editors.zopt import ZConfig
from kelight.evaluation import case_summary, evaluate_case, locality_reference
from kelight.metrics import EditMetrics
from kelight.models.loading import load
from kelight.objectives.sadr import sadr_terms
from kelight.results import append_partial, format_table, partial_path, write_results
from kelight.types import EditCase

log = logging.getLogger(__name__)
Regime = Literal["single", "batch", "sequential"]


def template_pairs(pairs: list[list[int]]) -> tuple[tuple[int, int], ...]:
    """CLI ``[[length, count], ...]`` as the editors' tuple of ``(length, count)`` pairs."""
    return tuple((int(a), int(b)) for a, b in pairs)


class EditModule(L.LightningModule):
    """Shared experiment loop over edit cases; subclasses provide ``build_editor``.

    Args:
        model_name: ``"smollm2-135m"``, ``"gemma3-270m"``, or a Hugging Face id/path.
        dtype: parameter dtype of the edited model.
        regime: ``single`` (restore after each case), ``batch`` (edit each loader batch of
            ``--data.batch_size`` cases jointly, then restore) or ``sequential`` (keep all edits).
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
        if regime not in ("single", "batch", "sequential"):
            raise ValueError(f"expected regime 'single', 'batch' or 'sequential', got {regime!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.lm = None
        self.tok = None
        self.editor = None
        self.undo = UndoLog()
        self.metrics = EditMetrics()
        self.source_metrics: dict[str, EditMetrics] = {}  # per data half, e.g. "counterfact"/"wikidata"
        self.case_rows: list[dict] = []
        self.edit_seconds: list[float] = []
        self.pending: list[tuple[EditCase, dict, float]] = []
        self.out_dir: Path | None = None  # the run directory (rank 0's under DDP)
        self.progress_seconds = 60.0  # log a progress line at most this often (long runs print nothing else)
        self._last_progress = self._run_start = time.perf_counter()

    # ---- model and editor -------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is None:
            self.lm, self.tok = load(
                self.hparams.model_name, dtype=self.hparams.dtype, device="cpu",
                attn_implementation=self.hparams.attn_implementation,
            )

    def build_editor(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: list[EditCase], device: torch.device, dataloader_idx: int) -> list:
        return batch  # cases are text; tensors are built on the model's device when needed

    def configure_optimizers(self) -> None:
        return None  # z and its optimiser are created per edit inside the editor

    def on_fit_start(self) -> None:
        self.editor = self.build_editor()
        self.editor.setup(self.lm, self.tok)
        self._reset_run()

    def _reset_run(self) -> None:
        # rank 0's directory: DDP processes started later may have picked another default one
        self.out_dir = Path(self.trainer.strategy.broadcast(str(self.trainer.default_root_dir)))
        partial_path(self.out_dir, self.global_rank).unlink(missing_ok=True)
        self.metrics.reset()
        self.source_metrics = {}
        self.case_rows, self.edit_seconds = [], []
        self._run_start = time.perf_counter()
        self._unedited_locality: dict = {}  # sequential regime: case id -> unedited locality predictions
        self.pending: list[tuple[EditCase, dict, float]] = []

    # ---- fit: edit + evaluate ---------------------------------------------------------
    def _log_progress(self) -> None:
        """One line: edits done of this process's total, mean edit seconds, wall time and what is left
        at this pace (evaluation included, except in the sequential regime, which evaluates at the end)."""
        done, n_batches = len(self.edit_seconds), self.trainer.num_training_batches
        batch_size = getattr(self.trainer.train_dataloader, "batch_size", None) or 1  # cases, not loader batches
        total = int(n_batches) * batch_size if math.isfinite(n_batches) else None
        elapsed = time.perf_counter() - self._run_start
        left = (f", about {elapsed / done * max(total - done, 0) / 60:.1f} min left" if total and done else "")
        log.info("%d%s edits done (%s regime), %.2f s/edit on average, %.1f min so far%s", done,
                 f"/{total}" if total else "", self.hparams.regime, sum(self.edit_seconds) / done, elapsed / 60,
                 left)

    def on_train_start(self) -> None:
        if self.hparams.regime == "sequential":
            self._record_unedited_locality(case for batch in self.trainer.train_dataloader for case in batch if case)

    def _record_unedited_locality(self, cases: Iterable[EditCase]) -> None:
        """Every case's locality predictions on the unedited model, before the first edit (for the
        regimes that keep their edits until all cases are evaluated)."""
        self._unedited_locality = {case.case_id: locality_reference(self.lm, self.tok, case) for case in cases}

    def _locality_reference(self, case: EditCase) -> dict:
        """The predictions a case's Locality compares against: the unedited model's, also in the sequential
        regime, where the model before this case's edit already holds the earlier edits (EasyEdit and
        PAC score consecutive editing against the unedited model; damage done by earlier edits counts)."""
        if self.hparams.regime == "sequential":
            return self._unedited_locality[case.case_id]
        return locality_reference(self.lm, self.tok, case)

    def _edit_groups(self, batch: list[EditCase]) -> list[list[EditCase]]:
        """The edits one loader batch makes: jointly in the batch regime, else one case at a time."""
        return [batch] if self.hparams.regime == "batch" else [[case] for case in batch]

    def training_step(self, batch: list[EditCase], batch_idx: int) -> None:
        if not batch:
            return  # the padding slot of a shorter shard under DDP (PaddedShardSampler)
        if self.hparams.regime == "single" and self.hparams.get("z_batch", 1) > 1 and len(batch) > 1:
            t0 = time.perf_counter()  # independent edits: their z's together, on the unedited weights
            zs = self.editor.compute_zs(self.lm, self.tok, [case.request for case in batch])
            z_seconds = (time.perf_counter() - t0) / len(batch)
            for case, z in zip(batch, zs, strict=True):
                self._edit([case], zs=[z], extra_seconds=z_seconds)
        else:
            for cases in self._edit_groups(batch):
                self._edit(cases)
                self._evaluate_so_far(len(cases))

    def _evaluate_so_far(self, n_new: int) -> None:
        """Sequential regime with ``eval_every`` N: log ``seq/*`` metrics of every case edited so far
        whenever the number of edits reaches or passes a multiple of N (joint edits add several)."""
        every, done = self.hparams.eval_every, len(self.pending)
        if self.hparams.regime != "sequential" or not every or done // every == (done - n_new) // every:
            return
        partial = EditMetrics(sync_on_compute=False).to(self.device)  # this process's shard
        for case, pre, _ in self.pending:
            partial.update(self._evaluate(case, pre))
        self.log_dict({f"seq/{k}": v for k, v in partial.compute().items()}, on_step=True, batch_size=1)

    def _evaluate(self, case: EditCase, pre: dict | None):
        return evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency, pre_locality=pre)

    def _edit(self, cases: list[EditCase], zs: list | None = None, extra_seconds: float = 0.0) -> None:
        """Edit ``cases`` jointly; evaluate and restore unless the regime is sequential.

        ``zs``: value vectors already optimised for ``cases`` (``z_batch``), taking ``extra_seconds`` per edit.
        """
        pres = [self._locality_reference(case) for case in cases]
        t0 = time.perf_counter()
        try:
            requests = [case.request for case in cases]
            info = (self.editor.apply(self.lm, self.tok, requests, self.undo) if zs is None
                    else self.editor.apply(self.lm, self.tok, requests, self.undo, zs=zs))
        except Exception:
            self.undo.restore()  # never leave a half-edited model behind
            raise
        seconds = (time.perf_counter() - t0) / len(cases) + extra_seconds  # per edit
        self.edit_seconds += [seconds] * len(cases)
        if time.perf_counter() - self._last_progress >= self.progress_seconds:
            self._last_progress = time.perf_counter()
            self._log_progress()
        self.log("edit/seconds", seconds, on_step=True, batch_size=len(cases))
        self.log("edit/z_steps", sum(z.steps_run for z in info.z) / len(info.z), on_step=True, batch_size=1)
        self.log("edit/final_loss", sum(z.losses[-1] for z in info.z) / len(info.z), on_step=True, batch_size=1)
        if self.hparams.regime == "sequential":
            self.pending += [(case, pre, seconds) for case, pre in zip(cases, pres, strict=True)]
            return
        try:
            for case, pre in zip(cases, pres, strict=True):
                self._record(case, self._evaluate(case, pre), seconds)
        finally:
            self.undo.restore()

    def _record(self, case: EditCase, result, seconds: float | None) -> None:
        self.metrics.update(result)
        if case.source not in self.source_metrics:
            self.source_metrics[case.source] = EditMetrics().to(self.device)
        self.source_metrics[case.source].update(result)
        row = {"id": case.case_id, "source": case.source, **case_summary(result)}
        if seconds is not None:
            row["edit_seconds"] = seconds
        self.case_rows.append(row)
        append_partial(self.out_dir or self.trainer.default_root_dir, row, self.global_rank)  # survives a crash

    def on_train_epoch_end(self) -> None:
        for case, pre, seconds in self.pending:  # sequential: every edit is in place now
            self._record(case, self._evaluate(case, pre), seconds)
        self.pending = []
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
            self._record(case, self._evaluate(case, locality_reference(self.lm, self.tok, case)), None)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "validate":
            self._finish("validate")

    # ---- output contract --------------------------------------------------------------
    def _finish(self, stage: str) -> None:
        """Report every case of every process (all ranks call this: metrics sync on compute)."""
        shards = gather_objects((self.case_rows, self.edit_seconds, sorted(self.source_metrics)))
        rows = interleave([shard[0] for shard in shards])  # dataset order, each case once
        seconds = [s for shard in shards for s in shard[1]]
        sources = sorted({name for shard in shards for name in shard[2]})
        values = self.metrics.compute()
        if len(sources) > 1:  # e.g. "counterfact/ES" next to the pooled "ES"
            for source in sources:  # same keys on every rank, even one that saw no case of a source
                metrics = self.source_metrics.setdefault(source, EditMetrics().to(self.device))
                values.update({f"{source}/{k}": v for k, v in metrics.compute().items()})
        values["n_cases"] = float(len(rows))
        if seconds:
            values["seconds_per_edit"] = sum(seconds) / len(seconds)
        if self.logger is not None:
            self.logger.log_metrics({f"{stage}/{k}": v for k, v in values.items()}, step=self.global_step)
        if self.trainer.is_global_zero:
            path = write_results(self.out_dir or self.trainer.default_root_dir, values, rows)
            log.info("wrote %s\n%s", path, format_table({stage: values}))
        self.final_metrics = values


class LocateEditModule(EditModule):
    """Shared arguments of the locate-then-edit methods (value-vector z optimisation).

    Args:
        steps: z optimisation steps (ROME paper: 20; the SADR reference used 80 with SADR).
        lr: Adam learning rate of z.
        kl_factor: ω of the essence KL.
        weight_decay: weight of ‖δ‖/‖v‖².
        clamp_norm_factor: ‖δ‖ ≤ factor·‖v‖.
        context_templates: ``[length, count]`` pairs of model-sampled prefixes.
        mom2_n_tokens: corpus tokens for the key second moment C.
        mom2_corpus: corpus for C (None: WikiText-2 in the shared data, else model samples).
        sadr_gamma: γ of the SADR attention-drift term (0 = off).
        sadr_selective: restrain only the heads that over-attend the subject (SADR); ``false``
            restrains every head after the edit point (the paper's all-heads ablation).
        z_batch: optimise the z of this many independent edits together in one padded batch
            (single regime: the cases of a loader batch, so set ``--data.batch_size`` too; MEMIT/PMET's
            batch regime: the batch's requests). Same results up to float rounding; pays on GPUs,
            where a z-step is launch-bound. Not with the sequential regime or ROME's batch regime,
            where each z must see the edits before it.
        cache_prefix: run each z-step only on the tokens from the subject on, over a KV cache of
            the rest (same result, ~2.5× faster ROME steps on CPU); ``false`` runs the full prompts.
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        steps: int = 20,
        lr: float = 0.5,
        kl_factor: float = 0.0625,
        weight_decay: float = 1e-3,
        clamp_norm_factor: float = 4.0,
        context_templates: list[list[int]] = [[5, 10], [10, 10]],  # noqa: B006 (CLI default)
        mom2_n_tokens: int = 100_000,
        mom2_corpus: str | None = None,
        sadr_gamma: float = 0.0,
        sadr_selective: bool = True,
        z_batch: int = 1,
        cache_prefix: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if z_batch > 1 and self.hparams.regime == "sequential":
            raise ValueError(f"z_batch={z_batch} optimises independent edits together, but in the sequential "
                             "regime each edit's z must see the edits before it; use z_batch 1")

    def sadr(self, edit_layer: int) -> tuple:
        """The SADR term for drift after ``edit_layer`` (empty when γ = 0)."""
        return sadr_terms(self.hparams.sadr_gamma, edit_layer + 1, self.hparams.sadr_selective)

    def z_config(self) -> ZConfig:
        h = self.hparams
        return ZConfig(steps=h.steps, lr=h.lr, kl_factor=h.kl_factor, weight_decay=h.weight_decay,
                       clamp_norm_factor=h.clamp_norm_factor, z_batch=h.z_batch,
                       cache_prefix=h.cache_prefix)

    def templates(self) -> tuple[tuple[int, int], ...]:
        return template_pairs(self.hparams.context_templates)


class ROME(LocateEditModule):
    """ROME (Meng et al. 2022); every argument is a CLI/sweep key (``--model.layer`` ...).

    Args:
        layer: edit layer.
        mom2_adjustment: use the key second moment C (else C = I).
        mean_key_insertion: store v* at the template-averaged key (R-ROME) instead of the plain
            prompt's key (ROME's reference).
        **kwargs: :class:`LocateEditModule` and :class:`EditModule` arguments.
    """

    def __init__(self, layer: int = 4, mom2_adjustment: bool = True, mean_key_insertion: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_editor(self) -> RomeEditor:
        h = self.hparams
        if h.z_batch > 1 and h.regime == "batch":
            raise ValueError(f"z_batch={h.z_batch}: ROME's batch regime applies the requests in turn, each z on "
                             "the weights edited before it; use the single regime with --data.batch_size to "
                             "optimise independent edits together")
        hp = RomeHParams(layer=h.layer, z=self.z_config(), context_templates=self.templates(),
                         mom2_adjustment=h.mom2_adjustment, mom2_n_tokens=h.mom2_n_tokens,
                         mom2_corpus=h.mom2_corpus, mean_key_insertion=h.mean_key_insertion)
        return RomeEditor(hp, self.sadr(h.layer))


class MEMIT(LocateEditModule):
    """MEMIT (Meng et al. 2023): the residual at the last layer of R spread over R's MLPs.

    Args:
        layers: edited layers R, ascending.
        mom2_update_weight: λ of ``(λ C + K Kᵀ)``.
        value_at: ``"block"`` (L's block output, the paper) or ``"mlp"`` (L's MLP output); unset: the
            MLP output on architectures that normalise it before the residual stream (Gemma-3).
        **kwargs: :class:`LocateEditModule` and :class:`EditModule` arguments.
    """

    pmet = False

    def __init__(self, layers: list[int] = [2, 3, 4, 5, 6], mom2_update_weight: float = 15000.0,  # noqa: B006
                 value_at: Literal["block", "mlp"] | None = None, **kwargs) -> None:
        kwargs.setdefault("context_templates", [[10, 5]])
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_editor(self) -> MemitEditor:
        h = self.hparams
        hp = MemitHParams(layers=tuple(h.layers), z=self.z_config(), context_templates=self.templates(),
                          mom2_update_weight=h.mom2_update_weight, mom2_n_tokens=h.mom2_n_tokens,
                          mom2_corpus=h.mom2_corpus, pmet=self.pmet, value_at=h.value_at)
        return MemitEditor(hp, self.sadr(hp.layers[-1]))


class PMET(MEMIT):
    """PMET (Li et al. 2024): attention and MLP deltas optimised at L, only the MLP one written."""

    pmet = True


class FT(EditModule):
    """FT-L, constrained fine-tuning of one MLP output matrix (Zhu et al. 2020; ROME's baseline).

    Args:
        layer: the layer whose MLP output matrix is fine-tuned.
        steps: Adam steps.
        lr: Adam learning rate.
        norm_constraint: ε, L∞ bound on each weight's change (ROME's FT-L: 5e-4).
        weight_decay: Adam weight decay on the weight change.
        context_templates: ``[length, count]`` pairs of sampled prefixes (``[]``: the plain prompt only).
        sadr_gamma: γ of the SADR attention-drift term (0 = off); drift is measured after ``layer``.
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        layer: int = 4,
        steps: int = 25,
        lr: float = 5e-4,
        norm_constraint: float = 5e-4,
        weight_decay: float = 0.0,
        context_templates: list[list[int]] = [],  # noqa: B006 (CLI default)
        sadr_gamma: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_editor(self) -> FTEditor:
        h = self.hparams
        hp = FTHParams(layer=h.layer, steps=h.steps, lr=h.lr, norm_constraint=h.norm_constraint,
                       weight_decay=h.weight_decay,
                       context_templates=template_pairs(h.context_templates))
        return FTEditor(hp, sadr_terms(h.sadr_gamma, h.layer + 1))
