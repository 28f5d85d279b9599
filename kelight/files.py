"""Read JSON, JSON-lines and YAML files; a file that does not parse raises a ``ValueError`` that names
the file, the line and the fix, instead of the parser's bare message.

Example:
    >>> parse_json('{"ES": 9', "run/metrics.json", "rerun the run")
    Traceback (most recent call last):
    ...
    ValueError: run/metrics.json is not valid JSON at line 1, column 9 (Expecting ',' delimiter); rerun the run
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml


def parse_json(text: str, path: str | os.PathLike[str], fix: str, line: int | None = None) -> object:
    """``json.loads(text)`` of ``path``'s content (of its line ``line``, for JSON lines).

    Raises:
        ValueError: ``"<path> is not valid JSON at line L, column C (<problem>); <fix>"``.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON at line {line or err.lineno}, column {err.colno} "
                         f"({err.msg}); {fix}") from err


def read_json(path: str | os.PathLike[str], fix: str) -> object:
    """The JSON value in ``path``; ``fix`` ends the error message of a file that does not parse."""
    return parse_json(Path(path).read_text(encoding="utf-8"), path, fix)


def read_jsonl(path: str | os.PathLike[str], fix: str) -> list[object]:
    """The JSON values of ``path``'s non-blank lines; an error names the first bad line."""
    lines = enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1)
    return [parse_json(text, path, fix, number) for number, text in lines if text.strip()]


def read_yaml(path: str | os.PathLike[str], fix: str) -> object:
    """The YAML document in ``path`` (``yaml.safe_load``); ``fix`` ends the error message of a file
    that does not parse."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
        raise ValueError(f"{path} is not valid YAML{where} ({problem}); {fix}") from err
