"""UltraEdit as a LightningModule: every CLI/sweep key (``--model.lr`` ...) reaches
:class:`~kelight.editors.ultraedit.UltraEditHParams`; the edit loop, regimes and metrics are :class:`EditModule`'s.

A turn is one :meth:`~kelight.editors.ultraedit.UltraEditor.apply`: a loader batch in the ``consecutive``
and ``batch`` regimes (``--data.batch_size`` requests, one forward + backward), one case in ``single`` and
``sequential``. The running moments persist across the turns of one fit and return to the warm-up's
whenever the weights are restored (after every case in ``single``, every batch in ``batch``).
"""

from __future__ import annotations

import dataclasses
import logging

from kelight.editors.ultraedit import SMOLLM2_LAYERS, StatsDtype, Tokens, UltraEditHParams, UltraEditor
from kelight.module import EditModule
from kelight.types import EditInputError, EditRequest, check_joint_requests

log = logging.getLogger(__name__)


class UltraEdit(EditModule):
    """UltraEdit (Gu et al. 2025): lifelong-normalised one-step shifts of late MLP output matrices, no z
    optimisation; StableEdit's warm-up and full whitening as options.

    Args:
        layers: layers whose MLP output matrix is edited, ascending.
        lr: ``η`` of the pseudo values ``v = −η ‖k̂‖² ĝ``.
        ridge: ``λ`` of the ridge regression ``min ‖ΔW K − V‖² + λ‖ΔW‖²``.
        tokens: ``target`` (the positions that predict the target tokens, the reference's) or ``all``
            (every token of prompt + target).
        pool_layers: one set of running moments for all edited layers (the reference) instead of one per layer.
        whiten: StableEdit's full whitening of the gradients.
        whiten_floor: eigenvalue floor of the whitening, relative to the mean eigenvalue.
        warmup_path: StableEdit's warm-up: a data file (any ``--data.format``) whose requests initialise the
            running moments before the first edit, on the unedited model, without editing them; unset: none.
            Without it a one-request turn is normalised by its own tokens alone (in ``single``, every turn).
        warmup_limit: the first this many records of ``warmup_path`` (after ``warmup_skip``).
        warmup_skip: leave out the first this many records of ``warmup_path`` (e.g. the ones being edited).
        stats_dtype: dtype of the running moments (``float64`` or ``float32``).
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        layers: list[int] = list(SMOLLM2_LAYERS),  # noqa: B006,B008 (CLI default)
        lr: float = UltraEditHParams.lr,
        ridge: float = UltraEditHParams.ridge,
        tokens: Tokens = "target",
        pool_layers: bool = True,
        whiten: bool = False,
        whiten_floor: float = UltraEditHParams.whiten_floor,
        warmup_path: str | None = None,
        warmup_limit: int = 1000,
        warmup_skip: int = 0,
        stats_dtype: StatsDtype = "float64",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._hparams_without_warmup()  # every method option checked now, before any model loads
        for name, value, low in (("warmup_limit", warmup_limit, 1), ("warmup_skip", warmup_skip, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise EditInputError(f"expected {name} to be an integer ≥ {low}, got {value!r}")
        if warmup_path is None and self.hparams.regime == "single":
            log.warning("UltraEdit in the single regime without --model.warmup_path: each edit is normalised by its "
                        "own target tokens alone (a one-token target is not edited at all); give a warm-up file")

    def _hparams_without_warmup(self) -> UltraEditHParams:
        h = self.hparams
        return UltraEditHParams(layers=tuple(h.layers), lr=h.lr, ridge=h.ridge, tokens=h.tokens,
                                pool_layers=h.pool_layers, whiten=h.whiten, whiten_floor=h.whiten_floor,
                                stats_dtype=h.stats_dtype)

    def warmup_requests(self) -> tuple[EditRequest, ...]:
        """The requests of ``warmup_path`` (``warmup_skip``, ``warmup_limit``), or none."""
        h = self.hparams
        if h.warmup_path is None:
            return ()
        from kelight.data.datamodule import EditDataModule  # noqa: PLC0415 (datasets only when reading files)

        data = EditDataModule(path=h.warmup_path, limit=h.warmup_limit, skip=h.warmup_skip)
        data.setup()
        return tuple(case.request for case in data.cases)

    def build_editor(self) -> UltraEditor:
        return UltraEditor(dataclasses.replace(self._hparams_without_warmup(), warmup=self.warmup_requests()))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.hparams.regime == "batch":  # one turn per loader batch: refuse conflicts first
            for batch in self.trainer.train_dataloader:
                if batch:
                    check_joint_requests([case.request for case in batch])
