"""Readers for the fields of one JSON record, with errors that name the record, the key and the fix.

Shared by the record formats of :mod:`kelight.data.formats`. Every reader raises
:class:`~kelight.types.EditInputError` of the form ``record 3 (case_id 17): key 'x': problem; fix``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kelight.types import EditInputError


def where(index: int, record: Mapping[str, Any]) -> str:
    """``record 3`` or ``record 3 (case_id 17)``: where in the file a problem is."""
    case_id = record.get("case_id") if isinstance(record, Mapping) else None
    return f"record {index}" + ("" if case_id is None else f" (case_id {case_id!r})")


def require_object(record: object, index: int) -> None:
    """Refuse a record that is not a JSON object (mapping)."""
    if not isinstance(record, Mapping):
        raise EditInputError(f"record {index}: expected a JSON object, got {type(record).__name__}")


def field_error(index: int, record: Mapping[str, Any], key: str, problem: str, fix: str) -> EditInputError:
    """The error for ``key`` of record ``index``: where, the key, the problem and the fix."""
    return EditInputError(f"{where(index, record)}: key {key!r}: {problem}; {fix}")


def read_text(value: object, index: int, record: Mapping[str, Any], key: str) -> str:
    """``value`` if it is a non-empty string (``key`` names it in the error)."""
    if not isinstance(value, str) or not value.strip():
        raise field_error(
            index,
            record,
            key,
            f"expected a non-empty string, got {value!r}",
            "give it a non-empty string or drop the record",
        )
    return value


def read_field(record: Mapping[str, Any], key: str, index: int) -> str:
    """The non-empty string under ``key`` (``None`` counts as missing)."""
    if record.get(key) is None:
        raise field_error(index, record, key, "missing", f"add {key!r} (keys present: {sorted(record)})")
    return read_text(record[key], index, record, key)


def same_text(a: str, b: str) -> bool:
    """Equal after ``strip`` and ``casefold`` (a right answer that equals the wrong one)."""
    return a.strip().casefold() == b.strip().casefold()


def is_list(value: object) -> bool:
    """A sequence that is not a string."""
    return isinstance(value, Sequence) and not isinstance(value, str)


def read_pairs(record: Mapping[str, Any], key: str, index: int) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs of a ``{prompts: [...], targets: [...]}`` block (absent → [])."""
    block = record.get(key)
    if block is None:
        return []
    prompts = block.get("prompts") if isinstance(block, Mapping) else None
    targets = block.get("targets") if isinstance(block, Mapping) else None
    if not (is_list(prompts) and is_list(targets)):
        raise field_error(
            index,
            record,
            key,
            f"expected {{'prompts': [...], 'targets': [...]}}, got {block!r}",
            "give two lists of strings",
        )
    if len(prompts) != len(targets):
        raise field_error(
            index,
            record,
            key,
            f"{len(prompts)} prompts but {len(targets)} targets",
            "give exactly one target per prompt",
        )
    return [
        (read_text(p, index, record, f"{key}.prompts[{i}]"), read_text(t, index, record, f"{key}.targets[{i}]"))
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True))
    ]


def read_texts(record: Mapping[str, Any], key: str, index: int) -> list[str]:
    """The non-empty list of non-empty strings under ``key`` (``None`` counts as missing)."""
    if record.get(key) is None:
        raise field_error(index, record, key, "missing", f"add {key!r}: a list of strings (keys present: "
                          f"{sorted(record)})")
    values = record[key]
    if not is_list(values) or not values:
        raise field_error(index, record, key, f"expected a non-empty list of strings, got {values!r}",
                          "give a list with at least one string")
    return [read_text(v, index, record, f"{key}[{i}]") for i, v in enumerate(values)]
