"""MEMIT and PMET as LightningModules (``configs/<model>/memit.yaml``, ``pmet.yaml``); their options are
``--model.editor.*`` (:class:`~kelight.editors.memit.MemitHParams`, :class:`~kelight.editors.memit.PmetHParams`)."""

from __future__ import annotations

from kelight.editors.memit import MemitEditor, MemitHParams, PmetEditor, PmetHParams, SpreadEditor
from kelight.methods.base import EditModule, check_z_batch


class MEMIT(EditModule):
    """MEMIT (Meng et al. 2023): the residual at the last layer of R spread over R's MLPs.

    Args:
        editor: MEMIT's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    JOINT = True

    def __init__(self, editor: MemitHParams = MemitHParams(), **kwargs) -> None:  # noqa: B008 (a frozen default)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_z_batch(editor.z_batch, self.hparams.regime)

    def build_editor(self) -> SpreadEditor:
        return MemitEditor(self.hparams.editor)


class PMET(EditModule):
    """PMET (Li et al. 2024): attention and MLP deltas optimised at L, only the MLP one written.

    Args:
        editor: PMET's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments.
    """

    JOINT = True

    def __init__(self, editor: PmetHParams = PmetHParams(), **kwargs) -> None:  # noqa: B008 (a frozen default)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_z_batch(editor.z_batch, self.hparams.regime)

    def build_editor(self) -> SpreadEditor:
        return PmetEditor(self.hparams.editor)
