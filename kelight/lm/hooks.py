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


def map_tensors(value: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """``fn`` applied to ``value`` if it is a tensor, or to each tensor of a (nested) tuple; other
    values unchanged (a module's output, e.g. a block's ``(hidden, ...)``)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    return value


@contextmanager
def trace(
    model: nn.Module, paths: Sequence[str], *, inputs: bool = False, stop: bool = False, detach: bool = True,
    raw: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or first input) of each module in ``paths`` during forward passes.

    Args:
        model: the model whose submodules are traced.
        paths: module paths to record.
        inputs: record the module's first positional input instead of its output.
        stop: raise :class:`StopForward` after the last path in ``paths`` ran (swallowed on exit),
            so layers after it are not computed.
        detach: store detached tensors.
        raw: record the output as the module returned it (e.g. a tuple) instead of its first tensor.

    Yields:
        A dict path -> tensor, filled as the forward passes run.
    """
    records: dict[str, torch.Tensor] = {}
    handles = []
    last = paths[-1] if paths else None

    def make(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            value = _first(args) if inputs else (output if raw else _first(output))
            records[path] = map_tensors(value, torch.Tensor.detach) if detach else value
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


class _Replay(nn.Module):
    """Stands in for a block: returns the recorded output whatever its input."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.output


@contextmanager
def replay_blocks(model: nn.Module, layers_path: str, n: int, output: object) -> Iterator[None]:
    """Skip blocks ``0 … n-1``: each returns ``output`` (the recorded output of block ``n - 1``).

    Valid while the inputs of the forward are the ones ``output`` was recorded on and nothing
    upstream of block ``n`` changes (e.g. an edit injected at or after block ``n``): the hidden
    states below the edit layer are then reused instead of recomputed. The blocks are put back in
    ``finally``. Hooks on the skipped blocks (and on their submodules) do not run while inside.
    """
    layers = model.get_submodule(layers_path)
    originals = [layers[i] for i in range(n)]
    try:
        for i in range(n):
            layers[i] = _Replay(output)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


@contextmanager
def module_attributes(modules: Sequence[nn.Module], name: str, values: Sequence[object]) -> Iterator[None]:
    """Set attribute ``name`` of ``modules[i]`` to ``values[i]`` while inside; removed in ``finally``.

    How a custom attention kernel learns per-module state (rows to return, weights to replay).
    """
    try:
        for module, value in zip(modules, values, strict=True):
            setattr(module, name, value)
        yield
    finally:
        for module in modules:
            if hasattr(module, name):
                delattr(module, name)


def add_at(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` function adding ``delta`` ``(D,)`` or ``(N, D)`` at ``(rows[i], cols[i])``."""

    def fn(output: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        out = output.clone()
        out[rows, cols] = out[rows, cols] + delta.to(out.dtype)
        return out

    return fn
