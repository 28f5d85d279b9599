"""What every analysis shares: how an edit is made and undone, probes, probabilities, output files.

An *edit function* ``edit(model, tok, request) -> undo`` edits the model in place and returns an
object whose ``restore()`` puts every weight back bit-exactly (a :class:`~kelight.editors.undo.
UndoLog`). :func:`edited` wraps it so the weights are restored in ``finally``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.undo import UndoLog
from kelight.lm.readouts import readouts
from kelight.lm.tokens import pad_id, target_ids
from kelight.types import EditCase, EditRequest, ScoredPrompt

# Specificity tasks: the right target is the true answer, the wrong one is o_edit.
SPECIFICITY_TASKS = ("neighbor", "distracted_neighbor", "relation")


class Restorable(Protocol):
    def restore(self) -> None: ...


EditFn = Callable[[PreTrainedModel, PreTrainedTokenizerBase, EditRequest], Restorable]


def editor_edit(editor) -> EditFn:
    """An edit function from a set-up editor (``RomeEditor``, ``MemitEditor``, ...; ``setup`` done)."""

    def edit(model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest) -> UndoLog:
        undo = UndoLog()
        try:
            editor.apply(model, tok, [request], undo)
        except BaseException:
            undo.restore()
            raise
        return undo

    return edit


def no_edit(model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest) -> UndoLog:
    """The identity edit (a control: every analysis must then show no effect)."""
    return UndoLog()


@contextmanager
def edited(model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest, edit: EditFn) -> Iterator[None]:
    """The model edited with ``request`` while inside; restored in ``finally``."""
    undo = edit(model, tok, request)
    try:
        yield
    finally:
        undo.restore()


def probes_of(case: EditCase, task: str) -> tuple[ScoredPrompt, ...]:
    """The case's prompts of ``task`` (empty if it has none)."""
    if task not in SPECIFICITY_TASKS:
        raise ValueError(f"unknown specificity task {task!r}; expected one of {list(SPECIFICITY_TASKS)}")
    return tuple(case.probes.get(task, ()))


def probabilities(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, probes: Sequence[ScoredPrompt]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(right), P(wrong))`` ``(N,)`` per probe: ``exp(-mean token NLL)``, the metrics' magnitude.

    For specificity probes ``right`` is o_true and ``wrong`` is o_edit. Unlike the evaluation's
    shared-prompt path, this is **one** right-padded forward of full sequences whose row ``2i`` is
    ``prompt_i + right_i`` and row ``2i + 1`` is ``prompt_i + wrong_i``: the layout the analyses'
    hooks and stored attention maps rely on (same numbers as :func:`kelight.evaluation.scoring.score_prompts`).
    """
    seqs, starts = [], []
    for probe in probes:
        for target in (probe.right, probe.wrong):
            prompt_ids, target_tokens = target_ids(tok, probe.prompt, target)
            seqs.append(prompt_ids + target_tokens)
            starts.append(len(prompt_ids))
    pad = pad_id(tok)
    outs = readouts(model, seqs, starts, pad, chunk=max(1, len(seqs)))
    p = torch.exp(torch.stack([logprobs.mean() for logprobs, _, _ in outs]))  # (2N,) exp(-mean NLL)
    return p[0::2], p[1::2]


def _jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as JSON (tensors as lists, NaN/inf as ``null``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return path


def save_outputs(result: dict, out_dir: str | Path, name: str, plot: Callable, title: str = "") -> dict:
    """Write ``<name>.json`` and ``<name>.png`` (drawn by ``plot(result, path, title)``) into ``out_dir``."""
    write_json(Path(out_dir) / f"{name}.json", result)
    plot(result, Path(out_dir) / f"{name}.png", title)
    return result


def layer_window(layer: int, window: int, n_layers: int) -> list[int]:
    """``window`` consecutive layers centred on ``layer`` (ROME's causal-tracing window), clipped."""
    if window < 1:
        raise ValueError(f"expected a window of at least 1 layer, got {window}")
    lo = max(0, min(layer - window // 2, n_layers - window))
    return list(range(lo, min(n_layers, lo + window)))
