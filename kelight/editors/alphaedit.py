"""AlphaEdit (Fang et al. 2025): MEMIT's value vectors and layers, each update projected onto the null space of
the preserved keys, keeping the keys edited before on the same weights.

Per layer, ``Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹`` (:func:`~kelight.editors.locate.solve.nullspace_update`):
P projects onto the eigenvectors of the key second moment C whose eigenvalue is below ``nullspace_threshold``,
and ``K_p K_pᵀ`` holds the keys this editor has written into the current weights (``edited_gram``), so that a
sequence of edits does not overwrite the earlier ones. The undo log that holds those edits clears the record
when it restores them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_number
from kelight.editors.locate.solve import nullspace_projector, nullspace_update
from kelight.editors.memit import SpreadEditor, SpreadHParams
from kelight.editors.undo import UndoLog
from kelight.types import EditInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlphaEditHParams(SpreadHParams):
    """AlphaEdit's hyper-parameters.

    Attributes:
        nullspace_threshold: P spans the eigenvectors of the key second moment C with eigenvalue below this (the
            paper's 2e-2; the count kept per layer is logged).
        nullspace_l2: α, the weight of the update's own norm (the reference's ``L2``: 10).
    """

    nullspace_threshold: float = 2e-2
    nullspace_l2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("nullspace_threshold", self.nullspace_threshold, positive=True)
        check_number("nullspace_l2", self.nullspace_l2, positive=True)


class AlphaEditor(SpreadEditor):
    """Computes and applies AlphaEdit updates; ``setup`` once per unedited model."""

    hp: AlphaEditHParams

    def __init__(self, hparams: AlphaEditHParams, *args: object, **kwargs: object) -> None:
        super().__init__(hparams, *args, **kwargs)
        self.projectors: dict[int, torch.Tensor] = {}  # layer -> null-space projector P
        self.edited_gram: dict[int, torch.Tensor] = {}  # layer -> K_p K_pᵀ of the edits in place

    def prepare_statistics(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """C at every layer of R, then each layer's null-space projector."""
        super().prepare_statistics(model, tok)
        self.edited_gram = {}
        self.projectors = {layer: self._projector(layer) for layer in self.hp.layers}

    def _projector(self, layer: int) -> torch.Tensor:
        threshold = self.hp.nullspace_threshold
        projector, rank = nullspace_projector(self.mom2[layer], threshold)
        if rank == 0:
            smallest = torch.linalg.eigvalsh(self.mom2[layer].double()).min().item()
            raise EditInputError(f"nullspace_threshold={threshold:g} leaves no null space at layer {layer}: every "
                                 f"eigenvalue of its key second moment C is above it (the smallest is {smallest:.3g});"
                                 f" raise nullspace_threshold above {smallest:.3g}")
        log.info("AlphaEdit null space at layer %d: %d of %d key directions (eigenvalues of C < %g)", layer, rank,
                 projector.shape[0], threshold)
        return projector

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """The null-space projected solve, keeping the keys edited before."""
        projector = self.projectors[layer].to(keys.device)
        prior = self.edited_gram.get(layer)
        return nullspace_update(keys, resid, projector, None if prior is None else prior.to(keys.device),
                                self.hp.nullspace_l2)

    def record_written(self, written: dict[int, torch.Tensor], undo: UndoLog) -> None:
        """These keys now hold edits that later ones must keep; forgotten when ``undo`` restores the weights."""
        for layer, keys in written.items():
            gram = keys.double() @ keys.double().T  # (d_in, d_in)
            self.edited_gram[layer] = self.edited_gram[layer] + gram if layer in self.edited_gram else gram
        undo.on_restore(self.edited_gram.clear)
