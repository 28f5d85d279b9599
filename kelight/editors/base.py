"""The interface every editor implements, and what one edit reports.

An editor is one method's math, configured by its hyper-parameter dataclass (``editor.hp``). Its life:

1. ``setup(model, tok)`` once, on the unedited model: it reads the model only (context templates, key
   statistics, null-space projectors, running moments) and changes no weight.
2. ``apply(model, tok, requests, undo)`` as often as the regime asks: it edits the model in place, and
   every weight change goes through ``undo`` (:meth:`~kelight.editors.undo.UndoLog.add_`), so that
   ``undo.restore()`` gives back the exact weights of before. State that follows the weights in place (the
   keys AlphaEdit has written, UltraEdit's running moments) registers ``undo.on_restore`` and is reset with
   them. Several requests are edited jointly where the method has a joint form (MEMIT, PMET, AlphaEdit,
   PathEdit, UltraEdit), else in turn, each on the weights the one before left. If ``apply`` fails, what it
   wrote is still in ``undo``: the caller restores (the LightningModules and :class:`kelight.EditSession` do).

Example:
    >>> from kelight.editors.rome import RomeEditor, RomeHParams
    >>> editor = RomeEditor(RomeHParams(layer=4))  # doctest: +SKIP
    >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
    >>> info = editor.apply(model, tok, [request], undo)  # doctest: +SKIP
    >>> undo.restore()  # doctest: +SKIP

``docs/design.md`` walks through adding an editor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.undo import UndoLog
from kelight.types import EditRequest, require_requests


@dataclass(frozen=True)
class EditInfo:
    """What one :meth:`Editor.apply` did, for the logs and ``cases.jsonl``.

    Attributes:
        steps: the optimisation steps each request took (early stops included), in request order; empty
            for a method without an optimisation per request (UltraEdit's one-step shifts). Requests edited by
            one joint optimisation (PathEdit) each report its steps.
        losses: each request's loss at every step of its optimisation, in the same order.
    """

    steps: tuple[int, ...] = ()
    losses: tuple[tuple[float, ...], ...] = ()

    @property
    def final_losses(self) -> tuple[float, ...]:
        """The last loss of each request's optimisation."""
        return tuple(losses[-1] for losses in self.losses if losses)


class Editor(ABC):
    """Base of every editor: ``setup`` once, then ``apply`` (module docstring). Subclasses implement
    :meth:`prepare` and :meth:`edit`; the checks every method shares (set up first, at least one request) are
    here, once.

    Args:
        hparams: the method's hyper-parameters (a frozen dataclass, validated on construction).
    """

    def __init__(self, hparams: Any) -> None:
        self.hp = hparams
        self._ready = False

    def setup(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Prepare to edit ``model`` (unedited); reads the model, changes no weight."""
        self._ready = False
        self.prepare(model, tok)
        self._ready = True

    def apply(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
              undo: UndoLog, **options: Any) -> EditInfo:
        """Edit ``requests`` into ``model`` in place, every weight change logged in ``undo``.

        Raises:
            RuntimeError: before :meth:`setup`.
            EditInputError: no request, or requests the method cannot edit together.
        """
        self.require_setup()
        require_requests(requests)
        return self.edit(model, tok, list(requests), undo, **options)

    def require_setup(self) -> None:
        """Refuse to compute edits before :meth:`setup` (the editor has no templates or statistics yet)."""
        if not self._ready:
            raise RuntimeError(f"call {type(self).__name__}.setup(model, tokenizer) before computing edits")

    @abstractmethod
    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """What :meth:`setup` does for this method."""

    @abstractmethod
    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog, **options: Any) -> EditInfo:
        """What :meth:`apply` does for this method, after the shared checks."""
