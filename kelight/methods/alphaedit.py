"""AlphaEdit as a LightningModule (``configs/<model>/alphaedit.yaml``); its options are ``--model.editor.*``
(:class:`~kelight.editors.alphaedit.AlphaEditHParams`)."""

from __future__ import annotations

from kelight.editors.alphaedit import AlphaEditHParams, AlphaEditor
from kelight.methods.base import EditModule, check_z_batch


class AlphaEdit(EditModule):
    """AlphaEdit (Fang et al. 2025): MEMIT's value vectors and layers, each update projected onto the null space of
    the preserved keys and keeping the edits made before on the same weights (the point of the sequential and
    consecutive regimes).

    Args:
        editor: AlphaEdit's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    JOINT = True

    def __init__(self, editor: AlphaEditHParams = AlphaEditHParams(), **kwargs) -> None:  # noqa: B008
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_z_batch(editor.z_batch, self.hparams.regime)

    def build_editor(self) -> AlphaEditor:
        return AlphaEditor(self.hparams.editor)
