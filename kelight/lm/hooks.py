"""Forward hooks as context managers: every hook is removed in ``finally``.

Hook targets are module paths (``"model.layers.4.mlp.down_proj"``), as in ROME's ``nethook``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


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


@contextmanager
def added_weight(module: nn.Module, deltas: Sequence[torch.Tensor],
                 rows: Sequence[torch.Tensor | None] | None = None) -> Iterator[None]:
    """Make ``module`` (a Linear or Conv1D, ``y = x W + b``) compute as if ``W += deltas[i]`` for the batch rows
    ``rows[i]`` (``(n,)`` indices; ``None``, the default for every delta: all rows), by adding ``x Δᵀ`` to its
    output in a forward hook; removed in ``finally``.

    Args:
        module: the module; its first positional input is ``x`` ``(B, ..., d_in)``.
        deltas: ``(d_out, d_in)`` each, in linear convention; gradients flow into them.
        rows: the batch rows each delta applies to.
    """
    rows = [None] * len(deltas) if rows is None else rows

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, ..., d_in)
        for delta, index in zip(deltas, rows, strict=True):
            if index is None:
                output = output + F.linear(x.to(delta.dtype), delta).to(output.dtype)  # (B, ..., d_out)
            else:
                part = F.linear(x.index_select(0, index).to(delta.dtype), delta).to(output.dtype)
                output = output.index_add(0, index, part)
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def linear_weight_changes(
    model: nn.Module, changes: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[nn.Module, torch.Tensor] | None:
    """Weight changes ``(parameter, change in the parameter's layout)`` by the module they belong to, in linear
    convention ``(d_out, d_in)`` (a Conv1D's change transposed), or ``None`` when one of them is not the weight
    of a Linear or Conv1D (a bias, a norm, an embedding): then only the changed model can replay them."""
    owners = {id(m.weight): m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))}
    out: dict[nn.Module, torch.Tensor] = {}
    for param, change in changes:
        module = owners.get(id(param))
        if module is None:
            return None
        out[module] = change.T if isinstance(module, Conv1D) else change
    return out


@contextmanager
def row_weight_changes(changes: Sequence[Mapping[nn.Module, torch.Tensor]], rows: Sequence[int]) -> Iterator[None]:
    """Within the block, batch row ``b`` runs on the model with the weight changes ``changes[rows[b]]`` added
    (:func:`linear_weight_changes`), every other row unchanged: one batch evaluates models edited in different
    ways, e.g. the single-edit regime's fluency samples of many cases. ``x Δᵀ`` is added to the unchanged
    module's output, so a row's values match the changed model's to float rounding, not bit for bit."""
    by_module: dict[nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for group, change in enumerate(changes):
        index = torch.tensor([b for b, g in enumerate(rows) if g == group], dtype=torch.long)
        if not len(index):
            continue
        for module, delta in change.items():
            deltas, indices = by_module.setdefault(module, ([], []))
            deltas.append(delta)
            indices.append(index.to(delta.device))
    with ExitStack() as stack:
        for module, (deltas, indices) in by_module.items():
            stack.enter_context(added_weight(module, deltas, indices))
        yield
