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
    PS of the unedited GPT-J, 17.70, is the reference's ``p-paraphrase`` number). Until session 15
    kelight pooled the alias prompts into PS instead; ``benchmarks/regroup_alias.py`` recomputes a
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
    require_object,
    same_text,
    where,
)
from kelight.types import EditCase, EditInputError, EditRequest, ScoredPrompt, TokenProbe

FormatName = Literal["counterfact_mix", "counterfact_edit"]
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
    if subject not in prompt:
        raise field_error(
            index,
            record,
            prefix + keys[1],
            f"subject {subject!r} does not occur in prompt {prompt!r}",
            "the prompt must contain the subject literally (not '{}')",
        )
    try:
        return EditRequest(prompt, subject, new, true, case_id=record.get("case_id", index))
    except EditInputError as err:
        raise EditInputError(f"{where(index, record)}: key {prefix + keys[2]!r}: {err}") from err


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


def detect_format(record: Mapping[str, Any]) -> FormatName:
    """Name the format of one record: ``"counterfact_mix"`` or ``"counterfact_edit"``.

    Raises:
        EditInputError: neither format's keys are present.
    """
    if isinstance(record, Mapping) and any(record.get(k) is not None for k in ("requested_rewrite", "rewrite")):
        return "counterfact_mix"
    if isinstance(record, Mapping) and all(record.get(k) is not None for k in ("prompt", "target_new")):
        return "counterfact_edit"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise EditInputError(
        f"cannot tell the record format from its keys {keys}: expected 'requested_rewrite' "
        f"(counterfact_mix) or {list(EDIT_KEYS)} (counterfact_edit); pass the format explicitly"
    )


def parse_record(
    record: Mapping[str, Any],
    index: int,
    format: Literal["auto", "counterfact_mix", "counterfact_edit"] = "auto",
    skipped: Counter[str] | None = None,
) -> EditCase:
    """Parse a record of the given format (``"auto"``: :func:`detect_format` on this record)."""
    name = detect_format(record) if format == "auto" else format
    if name == "counterfact_mix":
        return parse_counterfact_mix(record, index, skipped)
    if name == "counterfact_edit":
        return parse_counterfact_edit(record, index, skipped)
    raise EditInputError(f"expected format 'auto', 'counterfact_mix' or 'counterfact_edit', got {format!r}")
