"""UltraEdit as a LightningModule (``configs/<model>/ultraedit.yaml``); its options are ``--model.editor.*``
(:class:`~kelight.editors.ultraedit.UltraEditHParams`).

A turn is one :meth:`~kelight.editors.ultraedit.UltraEditor.apply`: a loader batch in the ``consecutive``
and ``batch`` regimes (``--data.batch_size`` requests, one forward + backward), one case in ``single`` and
``sequential``. The running moments persist across the turns of one fit and return to the warm-up's
whenever the weights are restored (after every case in ``single``, every batch in ``batch``).
"""

from __future__ import annotations

import logging

from kelight.editors.ultraedit import UltraEditHParams, UltraEditor
from kelight.methods.base import EditModule

log = logging.getLogger(__name__)


class UltraEdit(EditModule):
    """UltraEdit (Gu et al. 2025): lifelong-normalised one-step shifts of late MLP output matrices, no z
    optimisation; StableEdit's warm-up and full whitening as options.

    Args:
        editor: UltraEdit's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    JOINT = True

    def __init__(self, editor: UltraEditHParams = UltraEditHParams(), **kwargs) -> None:  # noqa: B008
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if editor.warmup_path is None and self.hparams.regime == "single":
            log.warning("UltraEdit in the single regime without --model.editor.warmup_path: each edit is normalised "
                        "by its own target tokens alone (a one-token target is not edited at all); give a warm-up "
                        "file")

    def build_editor(self) -> UltraEditor:
        return UltraEditor(self.hparams.editor)
