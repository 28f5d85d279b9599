"""FT-L as a LightningModule (``configs/<model>/ft.yaml``); its options are ``--model.editor.*``
(:class:`~kelight.editors.ft.FTHParams`)."""

from __future__ import annotations

from kelight.editors.ft import FTEditor, FTHParams
from kelight.methods.base import EditModule


class FT(EditModule):
    """FT-L, constrained fine-tuning of one MLP output matrix (Zhu et al. 2020; ROME's baseline). In the
    consecutive regime a loader batch is fine-tuned in turn, its L∞ bound holding for the batch's total change.

    Args:
        editor: FT's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    def __init__(self, editor: FTHParams = FTHParams(), **kwargs) -> None:  # noqa: B008 (a frozen default)
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_editor(self) -> FTEditor:
        return FTEditor(self.hparams.editor)
