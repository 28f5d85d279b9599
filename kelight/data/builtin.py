"""The built-in demo set: 32 counterfactual requests that SmolLM2-135M answers correctly.

The records are in the counterfact_mix format (``kelight/data/builtin/demo.json``), written for
kelight and shipped as package data. Each has a rewrite prompt, two paraphrases, two to four
neighbourhood prompts (other subjects sharing the true object), two or three generation prompts,
and some have other relations of the subject (``l-relation``) or a commonsense item. Unedited
SmolLM2-135M greedily completes every rewrite, neighbour and relation prompt with its true
answer; ``tests/data/test_builtin.py`` re-checks this with the real model (``-m slow``).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from kelight.data.formats import parse_counterfact_mix
from kelight.types import EditCase

_RESOURCE = ("builtin", "demo.json")


def builtin_path() -> Path:
    """Filesystem path of the built-in demo set (``kelight/data/builtin/demo.json``).

    Raises:
        FileNotFoundError: kelight is installed in a way that hides its package data (e.g. a
            zip); use :func:`builtin_cases` instead, which reads the resource directly.

    Example:
        >>> builtin_path().name
        'demo.json'
    """
    resource = files("kelight.data").joinpath(*_RESOURCE)
    if not isinstance(resource, Path) or not resource.is_file():
        raise FileNotFoundError(
            f"the built-in demo set is not a file on disk ({resource!r}); reinstall kelight from "
            f"a directory or wheel, or use kelight.data.builtin_cases()"
        )
    return resource


def builtin_cases() -> list[EditCase]:
    """Parse the built-in demo set without ``datasets`` (record index = case id).

    Example:
        >>> len(builtin_cases()) >= 25
        True
    """
    text = files("kelight.data").joinpath(*_RESOURCE).read_text(encoding="utf-8")
    return [parse_counterfact_mix(record, index) for index, record in enumerate(json.loads(text))]
