"""What ROME, MEMIT, PMET and AlphaEdit share: the templates sampled at setup and the value vectors z.

A locate-then-edit editor optimises, per request, a value vector z added at the subject's last token to the
output of the modules of :meth:`LocateEditor.z_paths` at its edit point (:mod:`kelight.editors.locate.zopt`),
then writes a closed-form weight update that makes the MLP produce it (:mod:`kelight.editors.locate.solve`).
Subclasses name the edited layers, where z goes, and what ``setup`` computes besides the templates.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.base import EditInfo, Editor
from kelight.editors.locate.hparams import LocateHParams
from kelight.editors.locate.zopt import ZResult, optimise_zs
from kelight.editors.rewrite import build_rewrite_batch, sample_context_templates
from kelight.lm.tokens import pad_id
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.objectives.base import ExtraLoss
from kelight.types import EditRequest


def z_info(zs: Sequence[ZResult]) -> EditInfo:
    """The :class:`~kelight.editors.base.EditInfo` of edits whose value vectors are ``zs``."""
    return EditInfo(steps=tuple(z.steps_run for z in zs), losses=tuple(tuple(z.losses) for z in zs))


class LocateEditor(Editor):
    """Base of the locate-then-edit editors.

    Args:
        hparams: a :class:`~kelight.editors.locate.hparams.LocateHParams` (or a subclass).
        extra_losses: terms added to the z objective besides SADR, which ``hparams`` switches on.
    """

    hp: LocateHParams

    def __init__(self, hparams: LocateHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        super().__init__(hparams)
        self.extra_losses = (*hparams.sadr(self.edit_point + 1), *extra_losses)  # attention after the edit point
        self.templates: list[str] = []
        self.adapter: ArchAdapter | None = None

    @property
    @abstractmethod
    def edited_layers(self) -> tuple[int, ...]:
        """The layers whose MLP output matrix the edit writes."""

    @property
    def edit_point(self) -> int:
        """The layer where z is added (the last edited one): blocks below it are replayed, attention after it
        is what SADR restrains."""
        return self.edited_layers[-1]

    @abstractmethod
    def z_paths(self) -> list[str]:
        """The modules whose output z is added to (after setup)."""

    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Check the layers, sample the context templates, then :meth:`prepare_statistics`."""
        self.adapter = adapter_for(model)
        for layer in self.edited_layers:
            self.adapter.check_layer(model, layer)
        self.templates = sample_context_templates(model, tok, self.hp.context_templates, self.hp.seed)
        self.prepare_statistics(model, tok)

    def prepare_statistics(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """What the method computes once on the unedited model besides the templates (key statistics)."""

    def compute_zs(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   requests: Sequence[EditRequest]) -> list[ZResult]:
        """The z of each request on the current weights, ``hp.z_batch`` requests per padded batch."""
        self.require_setup()
        device = next(model.parameters()).device
        batches = [build_rewrite_batch(tok, r, self.templates, device) for r in requests]
        return optimise_zs(model, self.z_paths(), batches, self.hp, self.extra_losses,
                           want_attn=bool(self.extra_losses), first_edited_block=self.edit_point, pad_id=pad_id(tok))
