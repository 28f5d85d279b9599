"""The exact undo log: every edit's weight change is recorded, and ``restore()`` gives back the weights bit for bit.

Deltas are given in the linear convention ``W: (d_out, d_in)``; ``transposed`` marks a Conv1D weight that is
stored the other way round (declared by its architecture adapter, never guessed from a shape).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class UndoLog:
    """Remembers each parameter's original values on first change; ``restore`` is bit-exact.

    Deltas are not subtracted back (floating point would not round-trip): the originals of the
    touched parameters are kept and copied back.
    """

    def __init__(self) -> None:
        self._originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._on_restore: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._originals)

    def remember(self, param: torch.Tensor) -> None:
        if id(param) not in self._originals:
            self._originals[id(param)] = (param, param.detach().clone())

    @torch.no_grad()
    def add_(self, param: torch.Tensor, delta: torch.Tensor, transposed: bool = False) -> None:
        """``param += delta`` (``delta`` in linear convention; ``transposed`` for Conv1D)."""
        if not torch.isfinite(delta).all():
            raise FloatingPointError("refusing to apply a weight update with NaN/inf entries")
        self.remember(param)
        view = param.T if transposed else param
        view.add_(delta.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def change_norm(self) -> torch.Tensor:
        """Frobenius norm of every remembered parameter's change since it was remembered (float32, 0-d;
        0 when nothing was remembered)."""
        squares = [(param.detach().float() - original.float()).square().sum()
                   for param, original in self._originals.values()]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())

    @torch.no_grad()
    def changes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every remembered parameter with its change since it was remembered (``param - original``, in the
        parameter's own layout)."""
        return [(param, param.detach() - original) for param, original in self._originals.values()]

    def absorb(self, other: UndoLog) -> None:
        """Take over ``other``'s record (of changes made after this log's): a parameter this log already
        remembers keeps its older original; ``other``'s restore callbacks become this log's. ``other`` is
        left empty."""
        for key, (param, original) in other._originals.items():
            self._originals.setdefault(key, (param, original))
        for callback in other._on_restore:
            self.on_restore(callback)
        other._originals.clear()
        other._on_restore = []

    def on_restore(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at the next :meth:`restore` (once, however often it is registered): for
        state that describes the edited weights, such as AlphaEdit's record of the keys edited so far."""
        if callback not in self._on_restore:
            self._on_restore.append(callback)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every remembered parameter back to its original value and forget them; then run and
        forget the :meth:`on_restore` callbacks."""
        for param, original in self._originals.values():
            param.copy_(original)
        self._originals.clear()
        callbacks, self._on_restore = self._on_restore, []
        for callback in callbacks:
            callback()
