"""Forward hooks as context managers: every hook is removed in ``finally``.

Hook targets are module paths (``"model.layers.4.mlp.down_proj"``), as in ROME's ``nethook``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (see :func:`trace` ``stop``)."""


def _first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[index,return-value]


@contextmanager
def trace(
    model: nn.Module, paths: Sequence[str], *, inputs: bool = False, stop: bool = False, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or first input) of each module in ``paths`` during forward passes.

    Args:
        model: the model whose submodules are traced.
        paths: module paths to record.
        inputs: record the module's first positional input instead of its output.
        stop: raise :class:`StopForward` after the last path in ``paths`` ran (swallowed on exit),
            so layers after it are not computed.
        detach: store detached tensors.

    Yields:
        A dict path -> tensor, filled as the forward passes run.
    """
    records: dict[str, torch.Tensor] = {}
    handles = []
    last = paths[-1] if paths else None

    def make(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            value = _first(args) if inputs else _first(output)
            records[path] = value.detach() if detach else value
            if stop and path == last:
                raise StopForward

        return hook

    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_hook(make(path)))
        try:
            yield records
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: nn.Module, path: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output ``o`` of the module at ``path`` by ``fn(o)`` while inside."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)  # type: ignore[arg-type]

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def add_at(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` function adding ``delta`` ``(D,)`` or ``(N, D)`` at ``(rows[i], cols[i])``."""

    def fn(output: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        out = output.clone()
        out[rows, cols] = out[rows, cols] + delta.to(out.dtype)
        return out

    return fn
