"""``kelight.edit``: edit a model in place from Python, with an exact undo handle."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.update import UndoLog
from kelight.editors.zopt import ZConfig
from kelight.objectives.sadr import sadr_terms
from kelight.types import EditInputError, EditRequest

METHODS = ("rome",)


def _as_requests(request: EditRequest | Mapping | Sequence) -> list[EditRequest]:
    if isinstance(request, EditRequest):
        return [request]
    if isinstance(request, Mapping):
        return [EditRequest(**request)]
    if isinstance(request, Sequence) and not isinstance(request, str):
        return [r for item in request for r in _as_requests(item)]
    raise EditInputError(f"expected an EditRequest, a dict of its fields, or a list of them; got {request!r}")


def rome_hparams(**options: object) -> RomeHParams:
    """Build :class:`RomeHParams` from flat keyword options (``steps=..., layer=...``).

    Raises:
        EditInputError: naming any option that does not exist, with the valid ones.
    """
    z_fields = {f.name for f in dataclasses.fields(ZConfig)}
    top_fields = {f.name for f in dataclasses.fields(RomeHParams)} - {"z"}
    unknown = sorted(set(options) - z_fields - top_fields)
    if unknown:
        raise EditInputError(
            f"unknown ROME option(s) {unknown}; valid options: {sorted(z_fields | top_fields)}"
        )
    z = ZConfig(**{k: v for k, v in options.items() if k in z_fields})
    top = {k: v for k, v in options.items() if k in top_fields}
    if "context_templates" in top:
        top["context_templates"] = tuple(tuple(x) for x in top["context_templates"])  # type: ignore[union-attr]
    return RomeHParams(z=z, **top)  # type: ignore[arg-type]


def edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest | Mapping | Sequence,
    method: str = "rome",
    **options: object,
) -> tuple[PreTrainedModel, UndoLog]:
    """Apply ``request`` (one or several, in order) to ``model`` in place.

    Args:
        model: a causal LM of an adapted architecture.
        tokenizer: its tokenizer.
        request: an :class:`EditRequest`, a dict of its fields, or a list of them.
        method: ``"rome"``.
        **options: method hyper-parameters, e.g. ``layer=4, steps=20, mom2_adjustment=False, sadr_gamma=1e-2``.

    Returns:
        ``(model, undo)``; ``undo.restore()`` returns every weight to its bit-exact original.
        On any error the model is left exactly as it was.

    Example:
        >>> model, undo = edit(model, tok, {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower",
        ...                                 "target_new": "Rome"}, layer=4)  # doctest: +SKIP
    """
    if method not in METHODS:
        raise EditInputError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    requests = _as_requests(request)
    gamma = float(options.pop("sadr_gamma", 0.0))  # type: ignore[arg-type]
    hparams = rome_hparams(**options)
    editor = RomeEditor(hparams, sadr_terms(gamma, hparams.layer + 1))
    undo = UndoLog()
    try:
        editor.setup(model, tokenizer)
        editor.apply(model, tokenizer, requests, undo)
    except BaseException:
        undo.restore()
        raise
    return model, undo
