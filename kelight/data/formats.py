"""Parse dataset records into :class:`~kelight.types.EditCase` objects.

Two record formats are understood (see ``../shared/data/README.md``):

``counterfact_mix``
    The CounterFact + WikiData_counterfact mix of the attention-drift (SADR) paper. Every group is
    a teacher-forced comparison of a *right* against a *wrong* target, as in the reference
    evaluation (``my_evaluate.py``):

    ======================  =====================  =========================  ==================
    record key              probe group            right                      wrong
    ======================  =====================  =========================  ==================
    ``rewrite``             rewrite                target_new                 target_true
    ``p-paraphrase``        paraphrase             target_new                 target_true
    ``l-neighbor``          neighbor               its target (true object)   target_new
    ``l-neighbor``          distracted_neighbor    as neighbor, prompt prefixed with
                                                   ``f"{rewrite prompt} {target_new}. "``
    ``l-relation``          relation               its target (true answer)   target_new
    ``p-reasoning``         reasoning              its target                 target_true
    ``p-subject_alias``     reasoning              target_new                 target_true
    ``o-commonsense``       commonsense            ``right``                  ``wrong``
    ``o-commonsense``       distracted_commonsense as commonsense, with the same prefix
    ======================  =====================  =========================  ==================

    Choices: PS is the ``p-paraphrase`` prompts only and RES pools the ``p-reasoning`` and
    ``p-subject_alias`` prompts, the reference's two "portability" keys (its summary lists them apart; the SADR
    paper's RES cites the portability of Yao et al. 2023, which includes subject aliases, and its
    PS of the unedited GPT-J, 17.70, is the reference's ``p-paraphrase`` number). Until 2026-11-27
    (commit e2c9fa9) kelight pooled the alias prompts into PS instead; ``benchmarks/regroup_alias.py`` recomputes a
    run made then under this grouping, exactly. Alias prompts are scored against ``target_new``,
    like the rewrite and paraphrase prompts, whatever their own ``targets`` say (in the dev split 19
    of 1700 alias targets, in 9 records, differ from target_new: synonyms such as "cisgender female" for
    "cisgender woman", or data errors). A relation, neighbour or
    reasoning prompt whose right target equals its wrong target (compared after ``strip`` and
    ``casefold``) cannot be scored; it is skipped and counted in the optional ``skipped``
    counter (the dev split has one relation prompt whose answer equals target_true, which is
    kept, and none that is skipped). Keys whose value is ``None`` count as absent, because
    ``datasets`` fills the keys one half of the mix lacks with ``None``.

``counterfact_edit``
    CounterFact in the flat EasyEdit format of the critical-path (PAC) paper. It yields token
    probes (efficacy, generality, locality) and the matching scored probes (rewrite, paraphrase,
    neighbor) so both metric families can be computed.

``zsre``
    The ZsRE question-answering evaluation records as MEND, ROME and EasyEdit distribute them
    (``zsre_mend_eval.json``: ``subject, src, alt, answers, rephrase, loc, loc_ans``; ``pred`` and
    ``cond`` are not read). As in EasyEdit and the PAC paper, the edit rewrites ``src`` to ``alt``
    (``target_new``) with ``answers[0]`` as ``target_true``; ROME's and MEMIT's original loader
    instead edited to ``answers[0]``, so their ZsRE numbers measure another edit. Token probes:
    efficacy ``(src, alt)``, generality ``(rephrase, alt)`` and locality ``(loc, loc_ans)`` (its
    ``nq question: `` prefix kept; scored against the unedited model's predictions, as for
    counterfact_edit). Scored probes: rewrite and paraphrase, ``alt`` against ``answers[0]``; no
    neighbour probe, since ``loc`` is an unrelated Natural Questions question on which ``alt`` is
    no plausible answer. The case id is the record's position in the file (EasyEdit's). The data's
    quirks, each handled on purpose:

    - ``alt`` empty (6 of the first 1,500 records, all asking for sex or gender): no new target,
      so no edit. :func:`parse_zsre` refuses such a record; :func:`parse_records` (and so
      ``--data.path`` and ``kelight.load_cases``) leaves it out and reports how many it left out
      (:func:`drop_reason`), as EasyEdit drops them. ``--data.limit``/``--data.skip`` count file
      records, so a selection holding such records yields fewer cases.
    - leading or trailing spaces in ``alt`` (38 records, e.g. ``" species"``), ``answers`` and
      ``loc_ans`` are stripped (kelight puts one space between a prompt and its target).
    - ``alt`` equal to ``answers[0]`` (after ``strip`` and ``casefold``; 44 records, 43 of them
      verbatim): the edit changes nothing a teacher-forced pair could measure. The case is kept
      (EasyEdit keeps it: its token accuracies are defined) with ``target_true=None`` and without
      rewrite/paraphrase pairs, which are counted in ``skipped`` like every unscoreable prompt.
    - doubled spaces in ``src`` (9 records) are kept: the subject occurs literally either way, and
      EasyEdit feeds the question as it is.

Malformed records raise :class:`~kelight.types.EditInputError` naming the record index, its
case id, the key and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kelight.data.fields import (
    field_error,
    is_list,
    read_field,
    read_pairs,
    read_text,
    read_texts,
    require_object,
    same_text,
    where,
)
from kelight.types import EditCase, EditInputError, EditRequest, ScoredPrompt, TokenProbe

FormatName = Literal["counterfact_mix", "counterfact_edit", "zsre"]
FORMATS: tuple[str, ...] = ("auto", "counterfact_mix", "counterfact_edit", "zsre")  # what `format=` takes
EDIT_KEYS = (
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)
MIX_REWRITE_KEYS = ("prompt", "subject", "target_new", "target_true")
ZSRE_KEYS = ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans")
EMPTY_ALT = "zsre record(s) with an empty 'alt' (no new target, so no edit; EasyEdit drops them too)"


def _scored(
    items: Sequence[tuple[str, str, str]], group: str, skipped: Counter[str] | None
) -> tuple[ScoredPrompt, ...]:
    """Scored prompts from ``(prompt, right, wrong)``; drops (and counts) right == wrong."""
    kept = tuple(ScoredPrompt(p, r, w) for p, r, w in items if not same_text(r, w))
    if skipped is not None and len(kept) < len(items):
        skipped[group] += len(items) - len(kept)
    return kept


def _request(record: Mapping[str, Any], index: int, keys: Sequence[str], prefix: str = "") -> EditRequest:
    """Build the :class:`EditRequest`; ``keys`` = (prompt, subject, target_new, target_true) names."""
    source = record if not prefix else record.get(prefix.rstrip("."))
    if not isinstance(source, Mapping):
        raise field_error(
            index,
            record,
            prefix.rstrip("."),
            f"expected a mapping, got {source!r}",
            "give {'prompt', 'subject', 'target_new', 'target_true'}",
        )
    values = []
    for key in keys:
        if source.get(key) is None:
            raise field_error(index, record, prefix + key, "missing", f"add {prefix + key!r}")
        values.append(read_text(source[key], index, record, prefix + key))
    prompt, subject, new, true = values
    _require_subject(record, index, prompt, subject, prefix + keys[1])
    relation = source.get("relation_id")  # optional: CounterFact's half of counterfact_mix has it
    if relation is not None:
        relation = read_text(relation, index, record, prefix + "relation_id")
    return _edit_request(record, index, (prompt, subject, new, true), prefix + keys[2], relation)


def _require_subject(record: Mapping[str, Any], index: int, prompt: str, subject: str, key: str) -> None:
    if subject not in prompt:
        raise field_error(
            index,
            record,
            key,
            f"subject {subject!r} does not occur in prompt {prompt!r}",
            "the prompt must contain the subject literally (not '{}')",
        )


def _edit_request(
    record: Mapping[str, Any], index: int, values: tuple[str, str, str, str | None], target_key: str,
    relation_id: str | None = None,
) -> EditRequest:
    """``EditRequest(prompt, subject, new, true)`` with the record's case id (its index without one)."""
    case_id = record.get("case_id")
    try:
        return EditRequest(*values, case_id=index if case_id is None else case_id, relation_id=relation_id)
    except EditInputError as err:
        raise EditInputError(f"{where(index, record)}: key {target_key!r}: {err}") from err


def _commonsense(record: Mapping[str, Any], index: int) -> tuple[str, str, str] | None:
    block = record.get("o-commonsense")
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise field_error(
            index,
            record,
            "o-commonsense",
            f"expected a mapping, got {block!r}",
            "give {'prompts': str, 'right': str, 'wrong': str}",
        )
    return tuple(read_text(block.get(k), index, record, f"o-commonsense.{k}") for k in ("prompts", "right", "wrong"))


def _generation(record: Mapping[str, Any], index: int) -> tuple[str, ...]:
    block = record.get("generation")
    if block is None:
        return ()
    prompts = block.get("prompts") if isinstance(block, Mapping) else None
    if not is_list(prompts):
        raise field_error(
            index,
            record,
            "generation",
            f"expected {{'prompts': [...]}}, got {block!r}",
            "give a list of prompt strings",
        )
    return tuple(read_text(p, index, record, f"generation.prompts[{i}]") for i, p in enumerate(prompts))


def _mix_items(record: Mapping[str, Any], index: int, req: EditRequest) -> dict[str, list[tuple[str, str, str]]]:
    """``group -> [(prompt, right, wrong)]`` for every probe group of a counterfact_mix record."""
    new, true = req.target_new, req.target_true
    prefix = f"{req.prompt} {new}. "
    neighbors = read_pairs(record, "l-neighbor", index)
    items = {  # rewrite/paraphrase/alias targets are target_new by construction: score that
        "rewrite": [(p, new, true) for p, _ in read_pairs(record, "rewrite", index)],
        "paraphrase": [(p, new, true) for p, _ in read_pairs(record, "p-paraphrase", index)],
        "neighbor": [(p, t, new) for p, t in neighbors],
        "relation": [(p, t, new) for p, t in read_pairs(record, "l-relation", index)],
        "distracted_neighbor": [(prefix + p, t, new) for p, t in neighbors],
        "reasoning": [(p, t, true) for p, t in read_pairs(record, "p-reasoning", index)]  # portability
        + [(p, new, true) for p, _ in read_pairs(record, "p-subject_alias", index)],
    }
    common = _commonsense(record, index)
    if common is not None:
        prompt, right, wrong = common
        items["commonsense"] = [(prompt, right, wrong)]
        items["distracted_commonsense"] = [(prefix + prompt, right, wrong)]
    return items


def parse_counterfact_mix(record: Mapping[str, Any], index: int, skipped: Counter[str] | None = None) -> EditCase:
    """Parse one record of the counterfact_mix (SADR paper) format.

    Args:
        record: the JSON object (keys described in ``../shared/data/README.md``).
        index: its position in the file; the case id when the record has no ``case_id``.
        skipped: optional counter, incremented per probe group for every prompt dropped because
            its right and wrong targets coincide.

    Returns:
        The edit case; probe groups the record lacks (or that end up empty) are left out.

    Raises:
        EditInputError: the record is malformed (names the index, the key and the fix).

    Example:
        >>> rec = {"requested_rewrite": {"prompt": "Paris is the capital of", "subject": "Paris",
        ...        "target_new": "Italy", "target_true": "France"},
        ...        "rewrite": {"prompts": ["Paris is the capital of"], "targets": ["Italy"]}}
        >>> parse_counterfact_mix(rec, 0).probes["rewrite"][0].wrong
        'France'
    """
    require_object(record, index)
    if record.get("requested_rewrite") is None:
        raise field_error(
            index,
            record,
            "requested_rewrite",
            "missing",
            "add {'prompt', 'subject', 'target_new', 'target_true'} (is this counterfact_edit?)",
        )
    if record.get("rewrite") is None:
        raise field_error(index, record, "rewrite", "missing", "add {'prompts': [...], 'targets': [...]}")
    req = _request(record, index, MIX_REWRITE_KEYS, prefix="requested_rewrite.")
    probes = {group: _scored(items, group, skipped) for group, items in _mix_items(record, index, req).items()}
    counterfact = record.get("p-paraphrase") is not None or record.get("l-neighbor") is not None
    return EditCase(
        request=req,
        probes={group: kept for group, kept in probes.items() if kept},
        generation_prompts=_generation(record, index),
        source="counterfact" if counterfact else "wikidata",
    )


def parse_counterfact_edit(record: Mapping[str, Any], index: int, skipped: Counter[str] | None = None) -> EditCase:
    """Parse one record of the flat EasyEdit counterfact format (PAC paper).

    Args:
        record: ``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
            locality_prompt, locality_ground_truth}``.
        index: its position in the file; the case id when the record has no ``case_id``.
        skipped: optional counter of dropped scored prompts (locality answer == target_new).

    Returns:
        An edit case with token probes (efficacy, generality, locality) and scored probes
        (rewrite, paraphrase, neighbor).

    Raises:
        EditInputError: the record is malformed (names the index, the key and the fix).
    """
    require_object(record, index)
    req = _request(record, index, ("prompt", "subject", "target_new", "ground_truth"))
    rephrase = read_field(record, "rephrase_prompt", index)
    local, local_true = (
        read_field(record, "locality_prompt", index),
        read_field(record, "locality_ground_truth", index),
    )
    new, true = req.target_new, req.target_true
    probes = {
        "rewrite": _scored([(req.prompt, new, true)], "rewrite", skipped),
        "paraphrase": _scored([(rephrase, new, true)], "paraphrase", skipped),
        "neighbor": _scored([(local, local_true, new)], "neighbor", skipped),
    }
    return EditCase(
        request=req,
        probes={group: kept for group, kept in probes.items() if kept},
        token_probes={
            "efficacy": (TokenProbe(req.prompt, new),),
            "generality": (TokenProbe(rephrase, new),),
            "locality": (TokenProbe(local, local_true),),
        },
        source="counterfact_edit",
    )


def parse_zsre(record: Mapping[str, Any], index: int, skipped: Counter[str] | None = None) -> EditCase:
    """Parse one ZsRE record (``zsre_mend_eval.json``): edit ``src`` → ``alt``, as EasyEdit and PAC do.

    Args:
        record: ``{subject, src, alt, answers, rephrase, loc, loc_ans}`` (``pred``, ``cond`` unread).
        index: its position in the file; the case id when the record has no ``case_id``.
        skipped: optional counter of dropped scored prompts (``alt`` equal to ``answers[0]``).

    Returns:
        An edit case with token probes (efficacy, generality, locality) and scored probes (rewrite,
        paraphrase: ``alt`` against ``answers[0]``); ``alt``, ``answers`` and ``loc_ans`` stripped.
        Where ``alt`` equals ``answers[0]``, ``target_true`` is ``None`` and the scored probes are left out.

    Raises:
        EditInputError: the record is malformed, or its ``alt`` is empty (no edit; :func:`parse_records`
            leaves such records out instead); the message names the index, the key and the fix.

    Example:
        >>> rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        ...        "alt": " University of Michigan", "answers": ["Illinois Institute of Technology"],
        ...        "rephrase": "What university did Watts Humphrey take part in?",
        ...        "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}
        >>> case = parse_zsre(rec, 0)
        >>> case.request.target_new, case.probes["rewrite"][0].wrong
        ('University of Michigan', 'Illinois Institute of Technology')
    """
    require_object(record, index)
    src, subject, rephrase, loc = (read_field(record, key, index) for key in ("src", "subject", "rephrase", "loc"))
    alt, loc_answer = (read_field(record, key, index).strip() for key in ("alt", "loc_ans"))
    true = read_texts(record, "answers", index)[0].strip()
    _require_subject(record, index, src, subject, "subject")
    request = _edit_request(record, index, (src, subject, alt, None if same_text(alt, true) else true), "alt")
    probes = {
        "rewrite": _scored([(src, alt, true)], "rewrite", skipped),
        "paraphrase": _scored([(rephrase, alt, true)], "paraphrase", skipped),
    }
    return EditCase(
        request=request,
        probes={group: kept for group, kept in probes.items() if kept},
        token_probes={
            "efficacy": (TokenProbe(src, alt),),
            "generality": (TokenProbe(rephrase, alt),),
            "locality": (TokenProbe(loc, loc_answer),),
        },
        source="zsre",
    )


def detect_format(record: Mapping[str, Any]) -> FormatName:
    """Name the format of one record: ``"counterfact_mix"`` (``requested_rewrite`` or ``rewrite``),
    ``"counterfact_edit"`` (``prompt`` and ``target_new``) or ``"zsre"`` (``src``).

    Raises:
        EditInputError: no format's keys are present.
    """
    if isinstance(record, Mapping) and any(record.get(k) is not None for k in ("requested_rewrite", "rewrite")):
        return "counterfact_mix"
    if isinstance(record, Mapping) and all(record.get(k) is not None for k in ("prompt", "target_new")):
        return "counterfact_edit"
    if isinstance(record, Mapping) and record.get("src") is not None:
        return "zsre"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise EditInputError(
        f"cannot tell the record format from its keys {keys}: expected 'requested_rewrite' "
        f"(counterfact_mix), {list(EDIT_KEYS)} (counterfact_edit) or {list(ZSRE_KEYS)} (zsre); "
        f"pass the format explicitly"
    )


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise EditInputError(f"expected format {' or '.join(map(repr, FORMATS))}, got {format!r}")


def parse_record(
    record: Mapping[str, Any],
    index: int,
    format: Literal["auto", "counterfact_mix", "counterfact_edit", "zsre"] = "auto",
    skipped: Counter[str] | None = None,
) -> EditCase:
    """Parse a record of the given format (``"auto"``: :func:`detect_format` on this record)."""
    _check_format(format)
    parse = {"counterfact_mix": parse_counterfact_mix, "counterfact_edit": parse_counterfact_edit, "zsre": parse_zsre}
    return parse[detect_format(record) if format == "auto" else format](record, index, skipped)


def drop_reason(record: Mapping[str, Any], format: str = "auto") -> str | None:
    """Why a record holds no edit and is left out of a data set, or ``None`` to parse it. Only a zsre record
    with an empty ``alt`` (:data:`EMPTY_ALT`) is left out; anything else malformed is an error of
    :func:`parse_record`.

    Example:
        >>> drop_reason({"src": "What is the sex of Phyllis Chan?", "alt": ""}) == EMPTY_ALT
        True
    """
    _check_format(format)
    if not isinstance(record, Mapping):
        return None
    alt = record.get("alt")
    zsre = (detect_format(record) if format == "auto" else format) == "zsre"
    return EMPTY_ALT if zsre and isinstance(alt, str) and not alt.strip() else None


def parse_records(
    records: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    format: Literal["auto", "counterfact_mix", "counterfact_edit", "zsre"] = "auto",
    skipped: Counter[str] | None = None,
    dropped: dict[str, list[int]] | None = None,
) -> list[EditCase]:
    """Parse ``records`` (found at file positions ``indices``), leaving out those that hold no edit.

    Args:
        records: the selected records.
        indices: their positions in the file (record numbers in errors, case ids without ``case_id``).
        format: as :func:`parse_record`.
        skipped: optional counter of unscoreable prompts per probe group (see the parsers).
        dropped: optional ``{reason: [index, ...]}`` filled with the records left out (:func:`drop_reason`).

    Raises:
        EditInputError: a record is malformed, or no record holds an edit.
    """
    cases, left_out = [], dropped if dropped is not None else {}
    for index, record in zip(indices, records, strict=True):
        reason = drop_reason(record, format)
        if reason is None:
            cases.append(parse_record(record, index, format, skipped))
        else:
            left_out.setdefault(reason, []).append(index)
    if records and not cases:
        raise EditInputError(f"none of the {len(records)} selected records holds an edit "
                             f"({describe_dropped(left_out)}); select other records (--data.skip/--data.limit)")
    return cases


def describe_dropped(dropped: Mapping[str, Sequence[int]]) -> str:
    """``left out 6 record(s): 6 zsre record(s) with an empty 'alt' (...) (records [54, 103, ...])``.

    Example:
        >>> describe_dropped({"record(s) without an edit": [3, 9]})
        'left out 2 record(s): 2 record(s) without an edit (records [3, 9])'
    """
    parts = [f"{len(ids)} {reason} (records {ids[:10]}{' ...' if len(ids) > 10 else ''})" for reason, ids in
             dropped.items()]
    return f"left out {sum(map(len, dropped.values()))} record(s): " + "; ".join(parts)
