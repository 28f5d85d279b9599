"""``kelight.edit`` and ``kelight.EditSession``: edit a model in place from Python, with an exact undo handle;
``kelight.load_cases``, ``kelight.unedited_predictions`` and ``kelight.evaluate``: score it as ``kelight fit`` does."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.undo import UndoLog
from kelight.evaluation.metrics import EditMetrics
from kelight.evaluation.scoring import (
    LOCALITY,
    evaluate_case,
    fluency_samples,
    load_ppl_texts,
    locality_reference,
    perplexity_stats,
)
from kelight.evaluation.wild import EvalProtocol, check_eval_protocol, generate_answers, wild_probes
from kelight.methods.registry import method as method_named
from kelight.types import EditCase, EditInputError, EditRequest, require_requests


def _as_requests(request: EditRequest | Mapping | Sequence) -> list[EditRequest]:
    if isinstance(request, EditRequest):
        return [request]
    if isinstance(request, Mapping):
        return [EditRequest.from_dict(request)]
    if isinstance(request, Sequence) and not isinstance(request, str):
        return [r for item in request for r in _as_requests(item)]
    raise EditInputError(f"expected an EditRequest, a dict of its fields, or a list of them; got {request!r}")


class EditSession:
    """Several edits of one model in turn: the editor is set up once (context templates, key statistics)
    and every edit builds on the ones before, as in the sequential regime (AlphaEdit keeps the keys of
    the earlier edits). One undo log returns the model to its weights before the session.

    Args:
        model: a causal LM of an adapted architecture (edited in place).
        tokenizer: its tokenizer.
        method: as :func:`edit`.
        **options: method hyper-parameters, as :func:`edit`.

    Example:
        >>> session = EditSession(model, tok, method="alphaedit", layers=[2, 3, 4, 5, 6])  # doctest: +SKIP
        >>> session.edit(request_a); session.edit([request_b, request_c])  # doctest: +SKIP
        >>> session.restore()  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, method: str = "rome",
                 **options: object) -> None:
        spec = method_named(method)
        self.model, self.tokenizer, self.method = model, tokenizer, spec.name
        self.editor = spec.editor(spec.build_hparams(**options))
        self.undo = UndoLog()
        self.n_edits = 0  # requests applied so far
        self.editor.setup(model, tokenizer)  # reads the model only; nothing to undo

    def edit(self, request: EditRequest | Mapping | Sequence) -> None:
        """Apply ``request`` (one or several; joint for MEMIT/PMET/AlphaEdit/PathEdit, in turn for ROME/FT; one
        turn of UltraEdit, whose running statistics carry over to the next call) on top of the earlier edits.
        On any error the model is left as it was before this call (the earlier edits stay)."""
        requests = _as_requests(request)
        require_requests(requests)
        change = UndoLog()
        try:
            self.editor.apply(self.model, self.tokenizer, requests, change)
        except BaseException:
            change.restore()
            raise
        self.undo.absorb(change)
        self.n_edits += len(requests)

    def restore(self) -> None:
        """Every weight back to its bit-exact value before the session; the session can edit again."""
        self.undo.restore()
        self.n_edits = 0


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
        method: ``"rome"``, ``"memit"``, ``"pmet"``, ``"alphaedit"``, ``"ft"``, ``"pathedit"`` or ``"ultraedit"``
            (several requests are edited jointly by MEMIT/PMET/AlphaEdit/PathEdit/UltraEdit, in turn by ROME/FT).
        **options: method hyper-parameters, e.g. ``layer=4, steps=20, mom2_adjustment=False, sadr_gamma=1e-2``.

    Returns:
        ``(model, undo)``; ``undo.restore()`` returns every weight to its bit-exact original.
        On any error the model is left exactly as it was.

    Example:
        >>> model, undo = edit(model, tok, {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower",
        ...                                 "target_new": "Rome"}, layer=4)  # doctest: +SKIP
    """
    requests = _as_requests(request)
    require_requests(requests)
    session = EditSession(model, tokenizer, method, **options)
    session.edit(requests)
    return model, session.undo


def load_cases(
    path: str | os.PathLike[str] | None = None,
    format: Literal["auto", "counterfact_mix", "counterfact_edit", "zsre"] = "auto",
    limit: int | None = None,
    skip: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_conflicting: bool = False,
    split: str | None = None,
) -> list[EditCase]:
    """The edit cases of a data file (or the built-in demo set for ``None``), selected and checked as
    ``--data.*`` selects them for ``kelight fit`` (same arguments, same cases, same errors).

    Example:
        >>> [case.request.subject for case in load_cases(limit=2)]
        ['Eiffel Tower', 'Colosseum']
    """
    from kelight.data.datamodule import EditDataModule  # noqa: PLC0415 (datasets only when reading files)

    data = EditDataModule(path=None if path is None else str(path), format=format, limit=limit, skip=skip,
                          shuffle=shuffle, seed=seed, drop_conflicting=drop_conflicting, split=split)
    data.setup()
    return list(data.cases)


def unedited_predictions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cases: Sequence[EditCase],
    eval_protocol: EvalProtocol = "teacher_forced", wild_template: str = "bare", wild_max_new_tokens: int = 32,
) -> list[dict]:
    """What the scores against the unedited model compare with: each case's predictions on its locality prompts
    (EasyEdit-style Locality) and, with ``eval_protocol`` wild or both, the model's generated answers to its
    neighbourhood/locality prompts (``wild_*_same``, ``wild_Locality``), by the model as it is now. Call it
    before editing and pass the result to :func:`evaluate` as ``unedited``, with the same evaluation options.
    """
    cases = _as_cases(cases)
    wild = check_eval_protocol(eval_protocol, wild_template, wild_max_new_tokens)
    answers = None
    if eval_protocol != "teacher_forced":  # generated across cases, in batches
        answers = generate_answers(model, tokenizer, cases, wild, reference_only=True)
    return [locality_reference(model, tokenizer, case, protocol=eval_protocol, wild=wild, answers=answers)
            for case in cases]


def _check_unedited(cases: list[EditCase], unedited: Sequence[Mapping] | None, eval_protocol: str) -> list:
    """``unedited`` checked to hold one reference per case (``{}`` each where no case needs one)."""
    if unedited is None:
        missing = [case.case_id for case in cases if (eval_protocol != "wild" and case.token_probes.get(LOCALITY))
                   or (eval_protocol != "teacher_forced" and wild_probes(case, reference_only=True))]
        if missing:
            what, options = "locality prompts, whose score compares", ""
            if eval_protocol != "teacher_forced":
                what = "locality or neighbourhood prompts, whose (wild) scores compare"
                options = f", eval_protocol={eval_protocol!r}, wild_template=..."
            raise EditInputError(
                f"cases {missing[:5]}{' ...' if len(missing) > 5 else ''} have {what} with the unedited model: call "
                f"kelight.unedited_predictions(model, tok, cases{options}) before editing and pass it as unedited=...")
        return [{}] * len(cases)
    if len(unedited) != len(cases):
        raise EditInputError(f"expected one unedited prediction per case, got {len(unedited)} for {len(cases)} "
                             f"cases; pass kelight.unedited_predictions(model, tok, cases) of these cases")
    return list(unedited)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[EditCase],
    unedited: Sequence[Mapping] | None = None,
    fluency: bool = False,
    ppl_corpus: str | os.PathLike[str] | None = None,
    eval_protocol: EvalProtocol = "teacher_forced",
    wild_template: str = "bare",
    wild_max_new_tokens: int = 32,
) -> dict[str, float]:
    """Score ``cases`` on the model as it is now, as ``kelight fit``/``validate`` score them: the keys of
    ``metrics.json`` (percent, with 95% CIs; pooled over all cases), and ``n_cases``.

    Args:
        model: the (edited) model.
        tokenizer: its tokenizer.
        cases: from :func:`load_cases`, or :class:`~kelight.types.EditCase` objects.
        unedited: :func:`unedited_predictions` of the unedited model, one per case, made with the same
            evaluation options; required when a case has locality prompts (counterfact_edit's Locality compares
            with the unedited model), or, evaluated wild, neighbourhood or locality prompts.
        fluency: also sample the generation prompts and report FL (slow on CPU).
        ppl_corpus: also report PPL on this corpus (``"corpus50"`` or a JSON file, as ``--model.ppl_corpus``).
        eval_protocol: ``teacher_forced``, ``wild`` (generated answers: ``wild_ES``, ...) or ``both``, as
            ``--model.eval_protocol``.
        wild_template: ``bare`` or ``qa``, as ``--model.wild_template``.
        wild_max_new_tokens: the cap on a generated answer's tokens, as ``--model.wild_max_new_tokens``.

    Example:
        >>> cases = load_cases("counterfact_edit.json", limit=20)  # doctest: +SKIP
        >>> before = unedited_predictions(model, tok, cases)  # doctest: +SKIP
        >>> session.edit([case.request for case in cases])  # doctest: +SKIP
        >>> evaluate(model, tok, cases, unedited=before)["Locality"]  # doctest: +SKIP
    """
    cases = _as_cases(cases)
    wild = check_eval_protocol(eval_protocol, wild_template, wild_max_new_tokens)
    unedited = _check_unedited(cases, unedited, eval_protocol)
    texts = load_ppl_texts(ppl_corpus)
    ppl = perplexity_stats(model, tokenizer, texts) if texts else None  # one model, one perplexity
    answers = generate_answers(model, tokenizer, cases, wild) if eval_protocol != "teacher_forced" else None
    samples = fluency_samples(model, tokenizer, cases) if fluency else {}  # across cases, as fit/validate draw them
    metrics = EditMetrics(sync_on_compute=False)
    for case, before in zip(cases, unedited, strict=True):
        metrics.update(evaluate_case(model, tokenizer, case, fluency=fluency, pre_locality=before, perplexity=ppl,
                                     protocol=eval_protocol, wild=wild, answers=answers,
                                     fluency_texts=samples.get(case.case_id)))
    return {**metrics.compute(), "n_cases": float(len(cases))}


def _as_cases(cases: Sequence[EditCase]) -> list[EditCase]:
    if isinstance(cases, EditCase):
        return [cases]
    cases = list(cases)
    if not cases or not all(isinstance(case, EditCase) for case in cases):
        raise EditInputError(f"expected a non-empty list of EditCase (kelight.load_cases(path)), got {cases!r:.200}")
    return cases
