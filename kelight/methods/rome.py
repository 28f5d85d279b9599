"""ROME as a LightningModule: ``kelight fit --config configs/<model>/rome.yaml``; its options are
``--model.editor.*`` (:class:`~kelight.editors.rome.RomeHParams`), the run's are :class:`EditModule`'s."""

from __future__ import annotations

from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.methods.base import EditModule, check_z_batch
from kelight.types import EditInputError


class ROME(EditModule):
    """ROME (Meng et al. 2022): a rank-one update of one MLP output matrix.

    Args:
        editor: ROME's hyper-parameters.
        **kwargs: :class:`~kelight.methods.base.EditModule` arguments (``model_name``, ``regime``, ...).
    """

    def __init__(self, editor: RomeHParams = RomeHParams(), **kwargs) -> None:  # noqa: B008 (a frozen default)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_z_batch(editor.z_batch, self.hparams.regime)
        if editor.z_batch > 1 and self.joint_batches:
            raise EditInputError(f"z_batch={editor.z_batch}: ROME's {self.hparams.regime} regime applies the requests "
                                 "in turn, each z on the weights edited before it; use the single regime with "
                                 "--data.batch_size to optimise independent edits together")

    def build_editor(self) -> RomeEditor:
        return RomeEditor(self.hparams.editor)
