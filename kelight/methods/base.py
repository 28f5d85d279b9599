"""LightningModules: one ``training_step`` = one batch of edit cases (docs/design.md, "The edit loop").

The z optimisation is a manual inner loop (``automatic_optimization = False``); a fresh z and
optimiser per edit. Regimes: ``single`` restores the weights (bit-exact) after evaluating each
case; ``batch`` edits a loader batch jointly (MEMIT/PMET; ROME applies them in turn), evaluates
and restores; ``sequential`` keeps every edit and evaluates all cases at the end (optionally every N
edits), then restores the model when the fit ends; ``consecutive`` keeps every edit too, each loader
batch one joint edit. Locality always compares against the unedited
model's predictions (recorded before the first edit in the sequential regime), as EasyEdit and PAC do.

``eval_protocol`` wild (or both) adds the generated-answer scores (:mod:`kelight.evaluation.wild`): the unedited
answers they compare with are part of the same pre-edit reference, and all cases evaluated on one model
state (a joint batch, the sequential regime's evaluations) have their answers generated in batches across
cases.

Several processes (``--trainer.devices N --trainer.strategy ddp``, :mod:`kelight.methods.distributed`) each
edit their own share of the loader batches (the one-process run's batches, so joint edits are
the same); the metrics, ``n_cases``, ``seconds_per_edit`` and ``cases.jsonl``
cover every case exactly once. The sequential and consecutive regimes are then sequential per share:
each process keeps only its own edits (N independent edit sequences, not one; the run warns).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from tqdm.auto import tqdm

from kelight.data.datamodule import BatchShardSampler
from kelight.editors.base import Editor
from kelight.editors.undo import UndoLog
from kelight.evaluation.metrics import EditMetrics
from kelight.evaluation.scoring import (
    CaseResult,
    case_summary,
    evaluate_case,
    fluency_samples,
    load_ppl_texts,
    locality_reference,
    perplexity_stats,
    wild_rows,
)
from kelight.evaluation.wild import EvalProtocol, check_eval_protocol, generate_answers, judge_case, replayed_answers
from kelight.lm.hooks import linear_weight_changes
from kelight.methods.distributed import gather_objects, interleave
from kelight.models.loading import load
from kelight.runs.merge import metrics_from_rows, run_summary
from kelight.runs.outputs import (
    append_partial,
    append_sequential,
    partial_path,
    read_partial_rows,
    sequential_path,
    write_results,
)
from kelight.runs.report import format_table
from kelight.types import KEEPING_REGIMES, EditCase, EditInputError, check_joint_requests, split_at_conflicts

log = logging.getLogger(__name__)
Regime = Literal["single", "batch", "sequential", "consecutive"]
REGIMES: tuple[str, ...] = get_args(Regime)


def check_z_batch(z_batch: int, regime: str) -> None:
    """Refuse ``z_batch`` > 1 in the sequential regime, where each edit's z must see the edits before it."""
    if z_batch > 1 and regime == "sequential":
        raise EditInputError(f"z_batch={z_batch} optimises independent edits together, but in the sequential "
                             "regime each edit's z must see the edits before it; use z_batch 1")


@dataclass
class _Deferred:
    """A restored single edit whose generations (fluency samples, wild answers) are drawn later with the edit
    replayed on its rows, together with others (:meth:`EditModule._sample_deferred`); or, with ``result``
    ``None``, a resumed case's row, kept in its place among them."""

    case: EditCase
    result: CaseResult | None = None  # scored without generations
    seconds: float = 0.0
    z_steps: int | None = None
    changes: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # linear_weight_changes of the edit
    pre: dict | None = None  # the case's pre-edit reference (its wild judgments compare with it)


class _RestoreOnError(L.Callback):
    """Lightning reports an error raised outside a module's guarded code (its backward and optimiser step,
    other callbacks, the sequential regime's final evaluation) only to callbacks, and then skips
    ``on_fit_end``: undo the edits there (:meth:`EditModule._abort`)."""

    def on_exception(self, trainer: L.Trainer, pl_module: EditModule, exception: BaseException) -> None:
        pl_module._abort()
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            pl_module._say_stopped("SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C (SIGINT)")


class EditModule(L.LightningModule):
    """Shared experiment loop over edit cases; each method's subclass (:mod:`kelight.methods`) takes its
    hyper-parameters as ``editor`` and provides ``build_editor``.

    Args:
        model_name: ``"smollm2-135m"``, ``"gemma3-270m"``, or a Hugging Face id/path.
        dtype: parameter dtype of the edited model.
        regime: ``single`` (restore after each case), ``batch`` (edit each loader batch of
            ``--data.batch_size`` cases jointly, then restore), ``sequential`` (keep all edits, one case
            after another) or ``consecutive`` (keep all edits, each loader batch one joint edit: the
            sequential batch editing of MEMIT/AlphaEdit's papers; methods without a joint form (ROME,
            FT) apply a batch's cases in turn: ROME exactly as ``sequential``; FT's L∞ bound then holds for
            the batch's total change, not each case's).
        eval_every: in the sequential/consecutive regimes, also evaluate the cases edited so far every N
            edits (``seq/*`` in the logger, one line each in ``sequential.jsonl`` of the run directory).
        fluency: generate from the case's generation prompts and report n-gram entropy (FL).
        attn_implementation: e.g. ``"eager"``; ``None`` keeps the model default.
        ppl_corpus: report PPL, the perplexity of each edited model on these texts (the SADR paper's
            ME-PPL probe: ``"corpus50"``, i.e. ``ppl/corpus50.json`` of the shared data), or a
            .txt/.json/.jsonl file of texts read as ``mom2_corpus`` files are
            (:func:`~kelight.editors.stats.corpus.read_corpus_file`); ``None`` skips it. Each text is cut to
            100 tokens.
        ppl_field: the text field of the corpus file's records (``"Text"`` in corpus50).
        eval_protocol: ``teacher_forced`` (the likelihood of each target after its prompt; no generation),
            ``wild`` (the model's greedy answer to each probe prompt, stopped at its natural end and judged
            against the target: ``wild_ES``, ``wild_NS``, ...) or ``both``.
        wild_template: how a probe prompt is framed for its answer: ``bare`` (the prompt itself) or ``qa``
            (``"Please answer the question:\\n\\nQ: {prompt}\\nA:"``, WILD's question-answering instruction).
        wild_max_new_tokens: the cap on a generated answer's tokens.
        eval_cases: in the sequential/consecutive regimes, score at each evaluation (every ``eval_every`` edits
            and at the end) a seeded uniform sample of this many of the cases edited so far (all of them while
            there are no more); ``0`` scores every case. For long streams, where scoring every edited case at
            every point would cost more than the edits; ``metrics.json`` then covers the final sample
            (``n_cases``) and says how many edits it was drawn from (``n_edits``).
        resume: continue the run in ``trainer.default_root_dir`` that was stopped: the cases its processes
            finished (``cases.partial*.jsonl``) are kept, not edited again, and the rest are edited; the end is
            the uninterrupted run's ``metrics.json`` (computed from the rows, as ``kelight merge`` does). Single
            and batch regimes (and ``kelight validate``); the other regimes keep their edits in memory, so a
            stopped run of theirs starts again. With fluency on, a single-regime case's row is written once its
            loader batch has sampled its fluency texts together (see ``_edit``), so a stop loses at most the
            cases of the batch in progress.
    """

    REGIMES: ClassVar[tuple[str, ...]] = REGIMES  # the regimes the method takes (PathEdit adds "joint")
    JOINT: ClassVar[bool] = False  # its editor edits several requests jointly (else in turn, like ROME and FT)

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        dtype: str = "float32",
        regime: Regime = "single",
        eval_every: int = 0,
        fluency: bool = True,
        attn_implementation: str | None = None,
        ppl_corpus: str | None = None,
        ppl_field: str = "Text",
        eval_protocol: EvalProtocol = "teacher_forced",
        wild_template: Literal["bare", "qa"] = "bare",
        wild_max_new_tokens: int = 32,
        eval_cases: int = 0,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.wild_config = check_eval_protocol(eval_protocol, wild_template, wild_max_new_tokens)
        if regime not in self.REGIMES:
            raise EditInputError(f"expected regime to be one of {list(self.REGIMES)} for {type(self).__name__}, got "
                                 f"{regime!r}")
        if eval_every < 0:
            raise EditInputError(f"expected eval_every >= 0 (0: evaluate once, after all edits), got {eval_every}")
        if eval_every and regime not in KEEPING_REGIMES:
            raise EditInputError(f"eval_every evaluates the edits kept so far, but the {regime} regime restores each "
                             f"edit after evaluating it; use --model.regime sequential or consecutive, or drop "
                             f"--model.eval_every")
        if not isinstance(eval_cases, int) or isinstance(eval_cases, bool) or eval_cases < 0:
            raise EditInputError(f"expected eval_cases to be an integer >= 0 (0: every case), got {eval_cases!r}")
        if eval_cases and regime not in KEEPING_REGIMES:
            raise EditInputError(f"eval_cases samples the edits kept so far, but the {regime} regime evaluates each "
                                 f"case once, right after its edit; use --model.regime sequential or consecutive, or "
                                 f"drop --model.eval_cases")
        if resume and regime in KEEPING_REGIMES:
            raise EditInputError(f"resume continues a run whose cases were edited and scored one at a time, but the "
                             f"{regime} regime keeps every edit in memory until the end, so a stopped run cannot be "
                             f"continued: run it again without --model.resume")
        self.ppl_texts = load_ppl_texts(ppl_corpus, ppl_field)  # read (and checked) now, before any model loads
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
        self.pending: list[tuple[EditCase, dict, float, int | None]] = []
        self._answers: dict[str, str] | None = None  # generated answers of the model as it is now (wild)
        self._fluency: dict[str, tuple[str, ...]] | None = None  # its fluency samples, case id -> texts
        self._deferred: list[_Deferred] = []  # restored edits waiting for their generations (see _edit)
        self._deferred_bytes = 0
        self._resumed: dict[object, dict] = {}  # resume: case id -> the row a stopped run wrote
        self.out_dir: Path | None = None  # the run directory (rank 0's under DDP)
        self.max_deferred_bytes = 1 << 30  # weight changes held for later generation before they are generated
        self.progress_seconds = 60.0  # log a progress line at most this often (long runs print nothing else)
        self._last_progress = self._run_start = time.perf_counter()

    # ---- model and editor -------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is None:
            self.lm, self.tok = load(
                self.hparams.model_name, dtype=self.hparams.dtype, device="cpu",
                attn_implementation=self.hparams.attn_implementation,
            )

    def build_editor(self) -> Editor:  # pragma: no cover - abstract
        """The method's editor, from its hyper-parameters (``self.hparams.editor``)."""
        raise NotImplementedError

    @property
    def z_batch(self) -> int:
        """Independent requests whose value vectors are optimised together (locate-then-edit editors), else 1."""
        return getattr(self.hparams.get("editor"), "z_batch", 1)

    def transfer_batch_to_device(self, batch: list[EditCase], device: torch.device, dataloader_idx: int) -> list:
        return batch  # cases are text; tensors are built on the model's device when needed

    def configure_optimizers(self) -> None:
        return None  # z and its optimiser are created per edit inside the editor

    def configure_callbacks(self) -> list[L.Callback]:
        return [_RestoreOnError()]

    def _abort(self) -> None:
        """A fit failed: every edit in place is undone (bit-exact), so no half-edited model is left behind."""
        self.undo.restore()

    def on_fit_start(self) -> None:
        self.editor = self.build_editor()
        self.editor.setup(self.lm, self.tok)
        self._reset_run()

    def _reset_run(self) -> None:
        # rank 0's directory: DDP processes started later may have picked another default one
        self.out_dir = Path(self.trainer.strategy.broadcast(str(self.trainer.default_root_dir)))
        self._resumed = read_partial_rows(self.out_dir) if self.hparams.resume else {}  # every process reads all
        if self.hparams.resume:
            log.info("resuming %s: %d finished cases kept", self.out_dir, len(self._resumed))
        else:
            partial_path(self.out_dir, self.global_rank).unlink(missing_ok=True)
        sequential_path(self.out_dir, self.global_rank).unlink(missing_ok=True)
        self.metrics.reset()
        self.source_metrics = {}
        self.case_rows, self.edit_seconds = [], []
        self._run_start = time.perf_counter()
        self._unedited_locality: dict = {}  # sequential regime: case id -> unedited locality predictions
        self.pending: list[tuple[EditCase, dict, float, int | None]] = []

    # ---- fit: edit + evaluate ---------------------------------------------------------
    def _log_progress(self) -> None:
        """One line: edits done of this process's total, mean edit seconds, wall time and what is left
        at this pace (evaluation included, except in the sequential regime, which evaluates at the end)."""
        done, total = len(self.edit_seconds), self._n_train_cases()
        elapsed = time.perf_counter() - self._run_start
        left = (f", about {elapsed / done * max(total - done, 0) / 60:.1f} min left" if total and done else "")
        log.info("%d%s edits done (%s regime), %.2f s/edit on average, %.1f min so far%s", done,
                 f"/{total}" if total else "", self.hparams.regime, sum(self.edit_seconds) / done, elapsed / 60,
                 left)

    def _n_train_cases(self) -> int | None:
        """The cases this process edits: its share under DDP (padding left out), else the loader's dataset."""
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, BatchShardSampler):
            return sum(i < len(sampler.dataset) for i in sampler.indices)
        dataset = getattr(loader, "dataset", None)
        return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None

    @property
    def joint_batches(self) -> bool:
        """The batch and consecutive regimes: each loader batch is one joint edit."""
        return self.hparams.regime in ("batch", "consecutive")

    @property
    def keeps_edits(self) -> bool:
        """The sequential and consecutive regimes: every edit stays until all cases are evaluated."""
        return self.hparams.regime in KEEPING_REGIMES

    def on_train_start(self) -> None:
        if self.keeps_edits and self.trainer.world_size > 1:
            rank_zero_warn(
                f"the {self.hparams.regime} regime over {self.trainer.world_size} processes makes "
                f"{self.trainer.world_size} independent edit sequences, each process keeping only the edits "
                f"of its own share of the cases; for one sequence of all edits run one process "
                f"(--trainer.devices 1)"
            )
        if self.JOINT and self.hparams.regime == "batch":  # one joint edit per loader batch: refuse conflicts first
            for batch in self.trainer.train_dataloader:
                if batch:
                    check_joint_requests([case.request for case in batch])
        if self.keeps_edits:
            batches = [list(batch) for batch in self.trainer.train_dataloader if batch]
            cases = [case for batch in batches for case in batch]
            points, done = [], 0  # edits in place at each evaluation: every eval_every, and the end
            for size in (len(group) for batch in batches for group in self._edit_groups(batch)):
                done += size
                every = self.hparams.eval_every
                if every and done // every != (done - size) // every:
                    points.append(done)
            self._eval_order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(0)).tolist()
            scored = sorted({i for point in [*points, len(cases)] for i in self._scored(point)})
            self._record_unedited_locality([cases[i] for i in scored])

    def _scored(self, n_done: int) -> list[int]:
        """Which of the ``n_done`` cases edited so far an evaluation scores (indices, in edit order): all of them,
        or with ``eval_cases`` k the first k of a seeded permutation of this process's cases that are edited."""
        k = self.hparams.eval_cases
        if not k or n_done <= k:
            return list(range(n_done))
        return sorted([i for i in self._eval_order if i < n_done][:k])

    def _record_unedited_locality(self, cases: Iterable[EditCase]) -> None:
        """Every case's pre-edit reference (locality predictions, unedited answers) on the unedited model,
        before the first edit (for the regimes that keep their edits until all cases are evaluated)."""
        cases = list(cases)
        with self._generations_for(cases, reference_only=True):
            self._unedited_locality = {case.case_id: self._reference(case) for case in cases}

    def _reference(self, case: EditCase) -> dict:
        """The case's pre-edit reference on the model as it is now
        (:func:`~kelight.evaluation.scoring.locality_reference`)."""
        return locality_reference(self.lm, self.tok, case, protocol=self.hparams.eval_protocol,
                                  wild=self.wild_config, answers=self._answers)

    def _references(self, cases: list[EditCase]) -> list[dict]:
        """What each case's Locality (and the wild ``*_same`` scores) compare against: the unedited model's
        predictions and answers, generated across the cases. In the keeping regimes, where the model before a
        case's edit already holds the earlier edits, the ones recorded before the first edit (EasyEdit and PAC
        score consecutive editing against the unedited model; damage done by earlier edits counts)."""
        if self.keeps_edits:
            return [self._unedited_locality.get(case.case_id) for case in cases]  # none: never scored (eval_cases)
        with self._generations_for(cases, reference_only=True):
            return [self._reference(case) for case in cases]

    @contextmanager
    def _generations_for(self, cases: list[EditCase], reference_only: bool = False,
                         generate: bool = True) -> Iterator[None]:
        """Within the block, what the model as it is now generates for ``cases``, drawn in batches across the
        cases and reused by each case's evaluation or reference: the wild answers to every prompt (only those
        compared with the unedited model's with ``reference_only``; none under the teacher-forced protocol)
        and, unless ``reference_only``, the fluency samples. Nothing with ``generate`` False (the cases'
        generations are drawn later with their edits replayed, :meth:`_sample_deferred`)."""
        if self.hparams.eval_protocol != "teacher_forced" and generate:
            self._answers = generate_answers(self.lm, self.tok, cases, self.wild_config,
                                             reference_only=reference_only)
        if self.hparams.fluency and generate and not reference_only:
            self._fluency = fluency_samples(self.lm, self.tok, cases)
        try:
            yield
        finally:
            self._answers = self._fluency = None

    def _edit_groups(self, batch: list[EditCase]) -> list[list[EditCase]]:
        """The edits one loader batch makes: jointly in the batch and consecutive regimes, else one case at
        a time. In the consecutive regime, a request that rewrites the prompt of an earlier one of its batch to
        another target starts the next joint edit (the batch regime refuses such batches before the first edit)."""
        if not self.joint_batches:
            return [[case] for case in batch]
        if self.hparams.regime == "batch":
            return [batch]
        bounds = [0, *split_at_conflicts([case.request for case in batch]), len(batch)]
        return [batch[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def training_step(self, batch: list[EditCase], batch_idx: int) -> None:
        if not batch:
            return  # a padding batch of a shorter share under DDP (BatchShardSampler)
        if self.hparams.regime == "single" and self.z_batch > 1 and len(batch) > 1:
            fresh = self._fresh(batch)
            t0 = time.perf_counter()  # independent edits: their z's together, on the unedited weights
            zs = self.editor.compute_zs(self.lm, self.tok, [case.request for case in fresh]) if fresh else []
            z_seconds = (time.perf_counter() - t0) / max(len(fresh), 1)
            z_of = dict(zip((case.case_id for case in fresh), zs, strict=True))
            for case in batch:
                self._edit([case], zs=[z_of[case.case_id]], extra_seconds=z_seconds) if case.case_id in z_of \
                    else self._keep_resumed(case)
        else:
            for cases in self._edit_groups(batch):
                if not self._fresh(cases):
                    for case in cases:
                        self._keep_resumed(case)
                    continue
                self._edit(cases)
                self._evaluate_so_far(len(cases))
        self._sample_deferred()

    def _fresh(self, cases: list[EditCase]) -> list[EditCase]:
        """The cases a resumed run has not finished yet (all of them in a run that is not resumed)."""
        return [case for case in cases if case.case_id not in self._resumed]

    def _keep_resumed(self, case: EditCase) -> None:
        """A case the stopped run finished: its row as it was written, in its place in this run's rows."""
        if self._deferred:  # after the rows before it
            self._deferred.append(_Deferred(case))
            return
        self.case_rows.append(self._resumed[case.case_id])

    def _say_stopped(self, signal_name: str) -> None:
        """The last line of a run stopped by a signal: what it kept and how to go on."""
        out = self.out_dir or self.trainer.default_root_dir
        if self.keeps_edits:
            log.error("stopped by %s after %d edits; the %s regime scores its cases only at the end, so nothing was "
                      "kept: run it again", signal_name, len(self.edit_seconds), self.hparams.regime)
            return
        log.error("stopped by %s with %d cases finished on this process; their rows are kept in "
                  "%s/cases.partial*.jsonl: continue with the same command and --model.resume true", signal_name,
                  len(self.case_rows), out)

    def _evaluate_so_far(self, n_new: int) -> None:
        """Sequential regime with ``eval_every`` N: log ``seq/*`` metrics of every case edited so far
        whenever the number of edits reaches or passes a multiple of N (joint edits add several), and
        append them to ``sequential.jsonl`` in the run directory (``{"edits": N, "ES": ..}``; under DDP
        one file per process, whose shard is its own sequence)."""
        every, done = self.hparams.eval_every, len(self.pending)
        if not self.keeps_edits or not every or done // every == (done - n_new) // every:
            return
        partial = EditMetrics(sync_on_compute=False).to(self.device)  # this process's shard
        ppl = self._perplexity()
        scored = [self.pending[i] for i in self._scored(done)]
        with self._generations_for([case for case, _, _, _ in scored]):
            for case, pre, _, _ in scored:
                partial.update(self._evaluate(case, pre, ppl))
        values = partial.compute()
        self.log_dict({f"seq/{k}": v for k, v in values.items()}, on_step=True, batch_size=1)
        append_sequential(self.out_dir or self.trainer.default_root_dir,
                          {"edits": done, **{k: float(v) for k, v in values.items()}}, self.global_rank)

    def _perplexity(self) -> tuple[float, int] | None:
        """``(summed NLL, tokens)`` of the model as it is now on ``ppl_corpus``, or ``None`` without one.
        Computed once per model state and given to every case evaluated on it."""
        return perplexity_stats(self.lm, self.tok, self.ppl_texts) if self.ppl_texts else None

    def _evaluate(self, case: EditCase, pre: dict | None, ppl: tuple[float, int] | None = None,
                  generate: bool = True) -> CaseResult:
        """The case scored on the model as it is now; without ``generate``, no fluency samples or wild answers
        (:meth:`_sample_deferred` adds them)."""
        return evaluate_case(self.lm, self.tok, case, fluency=self.hparams.fluency and generate, pre_locality=pre,
                             perplexity=ppl, protocol=self.hparams.eval_protocol, wild=self.wild_config,
                             answers=self._answers, fluency_texts=(self._fluency or {}).get(case.case_id),
                             judge_wild=generate)

    def _edit(self, cases: list[EditCase], zs: list | None = None, extra_seconds: float = 0.0) -> None:
        """Edit ``cases`` jointly; evaluate and restore unless the regime keeps its edits.

        ``zs``: value vectors already optimised for ``cases`` (``z_batch``), taking ``extra_seconds`` per edit.
        """
        fresh = self._fresh(cases)  # a resumed joint batch is edited whole, but only its new cases are scored
        pres = dict(zip((case.case_id for case in fresh), self._references(fresh), strict=True))
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
        if info.steps:  # a method that optimises per request
            self.log("edit/z_steps", sum(info.steps) / len(info.steps), on_step=True, batch_size=1)
            self.log("edit/final_loss", sum(info.final_losses) / len(info.steps), on_step=True, batch_size=1)
        steps = list(info.steps) if len(info.steps) == len(cases) else [None] * len(cases)
        if self.keeps_edits:  # never resumed: every case is fresh
            self.pending += [(case, pres[case.case_id], seconds, n) for case, n in zip(cases, steps, strict=True)]
            return
        try:
            ppl = self._perplexity()
            # generation (fluency samples, wild answers), one edited model at a time, is a run's slowest step:
            # replay the edit on its rows later, in batches across the cases (a change only the edited model can
            # replay is generated now)
            generates = self.hparams.fluency or self.hparams.eval_protocol != "teacher_forced"
            changes = linear_weight_changes(self.lm, self.undo.changes()) if generates else None
            with self._generations_for(fresh, generate=changes is None):
                for case, n in zip(cases, steps, strict=True):
                    if case.case_id not in pres:
                        self._keep_resumed(case)
                    elif changes is None:
                        self._record(case, self._evaluate(case, pres[case.case_id], ppl), seconds, n)
                    else:
                        result = self._evaluate(case, pres[case.case_id], ppl, generate=False)
                        self._deferred.append(_Deferred(case, result, seconds, n, changes, pres[case.case_id]))
        finally:
            self.undo.restore()
        if changes is not None:
            self._deferred_bytes += sum(d.numel() * d.element_size() for d in changes.values())
            if self._deferred_bytes > self.max_deferred_bytes:
                self._sample_deferred()

    def _sample_deferred(self) -> None:
        """Generate for the restored edits waiting for it, each on its own edit replayed on its rows (fluency
        samples, :func:`~kelight.evaluation.scoring.fluency_samples`; wild answers,
        :func:`~kelight.evaluation.wild.replayed_answers`), judge, and record their rows in order."""
        if not self._deferred:
            return
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        edited = [d for d in deferred if d.result is not None]
        changes = {d.case.case_id: d.changes for d in edited}
        cases = [d.case for d in edited]
        texts = fluency_samples(self.lm, self.tok, cases, changes=changes) if self.hparams.fluency else None
        answers = (replayed_answers(self.lm, self.tok, cases, self.wild_config, changes)
                   if self.hparams.eval_protocol != "teacher_forced" else None)
        for d in deferred:
            if d.result is None:
                self._keep_resumed(d.case)
                continue
            result = d.result if texts is None else replace(d.result, texts=texts[d.case.case_id])
            if answers is not None:  # every answer is there: judge_case generates nothing
                judged = judge_case(self.lm, self.tok, d.case, d.pre, self.wild_config, answers[d.case.case_id])
                result = replace(result, wild=judged)
            self._record(d.case, result, d.seconds, d.z_steps)

    def _record(self, case: EditCase, result, seconds: float | None, z_steps: int | None = None) -> None:
        self.metrics.update(result)
        if case.source not in self.source_metrics:
            self.source_metrics[case.source] = EditMetrics().to(self.device)
        self.source_metrics[case.source].update(result)
        row = {"id": case.case_id, "source": case.source, **case_summary(result)}
        if seconds is not None:
            row["edit_seconds"] = seconds
        if z_steps is not None:  # optimisation steps this case's value vector took (early stop included)
            row["z_steps"] = z_steps
        if result.wild:  # every generated answer beside its prompt and target
            row["wild"] = wild_rows(result)
        self.case_rows.append(row)
        append_partial(self.out_dir or self.trainer.default_root_dir, row, self.global_rank)  # survives a crash

    def on_train_epoch_end(self) -> None:
        ppl = self._perplexity() if self.pending else None
        scored = [self.pending[i] for i in self._scored(len(self.pending))]
        with self._generations_for([case for case, _, _, _ in scored]):
            for case, pre, seconds, z_steps in tqdm(scored, desc="scoring the kept edits", unit="case",
                                                    disable=len(scored) < 20 or not self.trainer.is_global_zero):
                self._record(case, self._evaluate(case, pre, ppl), seconds, z_steps)
        self.pending = []
        self._finish("fit")

    def on_fit_end(self) -> None:
        self.undo.restore()  # sequential: the in-memory model returns to the unedited weights

    # ---- validate: the unedited model -------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._reset_run()
            self._unedited_ppl = self._perplexity()  # one model for every case

    def validation_step(self, batch: list[EditCase], batch_idx: int) -> None:
        if self.trainer.state.fn != "validate":
            return  # during fit, editing cases is the whole job; no extra evaluation pass
        with self._generations_for(self._fresh(batch)):  # the unedited answers: its reference and evaluation share them
            for case in batch:
                if case.case_id in self._resumed:
                    self._keep_resumed(case)
                else:
                    self._record(case, self._evaluate(case, self._reference(case), self._unedited_ppl), None)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "validate":
            self._finish("validate")

    # ---- output contract --------------------------------------------------------------
    def _shard_block(self, stage: str) -> int:
        """Cases per unit the stage's loader deals out to the processes: training batches for fit
        (:class:`~kelight.data.datamodule.BatchShardSampler`), single cases for validate."""
        sampler = getattr(self.trainer.train_dataloader, "sampler", None) if stage == "fit" else None
        return sampler.batch_size if isinstance(sampler, BatchShardSampler) else 1

    def _computed_metrics(self, sources: list[str]) -> dict[str, float]:
        """The metric states of every process's cases (synced), per source too when there are several."""
        values = self.metrics.compute()
        if len(sources) > 1:  # e.g. "counterfact/ES" next to the pooled "ES"
            for source in sources:  # same keys on every rank, even one that saw no case of a source
                metrics = self.source_metrics.setdefault(source, EditMetrics().to(self.device))
                values.update({f"{source}/{k}": v for k, v in metrics.compute().items()})
        return values

    def _finish(self, stage: str) -> None:
        """Report every case of every process (all ranks call this: metrics sync on compute)."""
        shards = gather_objects((self.case_rows, self.edit_seconds, sorted(self.source_metrics)))
        rows = interleave([shard[0] for shard in shards], self._shard_block(stage))  # dataset order, each once
        seconds = [s for shard in shards for s in shard[1]]
        sources = sorted({name for shard in shards for name in shard[2]})
        if self._resumed:  # the kept cases are rows, not metric states: every score from the rows, as merge does
            values = metrics_from_rows(rows)
        else:
            values = {**self._computed_metrics(sources), **run_summary(rows, seconds)}
        if self.hparams.eval_cases:
            values["n_edits"] = float(len(seconds))
        if self.logger is not None:
            self.logger.log_metrics({f"{stage}/{k}": v for k, v in values.items()}, step=self.global_step)
        if self.trainer.is_global_zero:
            path = write_results(self.out_dir or self.trainer.default_root_dir, values, rows)
            log.info("wrote %s\n%s", path, format_table({stage: values}))
        self.final_metrics = values
