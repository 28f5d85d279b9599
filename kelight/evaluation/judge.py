"""Judging generated answers (the wild evaluation protocol): normaliser, exact match, token-F1, scores.

An answer is the model's greedy continuation of a probe prompt, cut at its natural end
(:func:`kelight.lm.generation.answer_text`). It is judged after SQuAD's normalisation
(:func:`normalize_answer`: case folded, punctuation removed, the articles *a*, *an*, *the* removed,
whitespace collapsed):

* **exact match** (:func:`gives`): the normalised target is a prefix of the normalised answer, ending at
  a word boundary. ``"Paris, France"`` gives ``Paris``; ``"Parisian"`` and ``"the city of Paris"`` do not.
  A target that normalises to nothing is given by no answer.
* **token-F1** (:func:`token_f1`): SQuAD's F1 of the normalised words, reported beside each exact-match
  score as ``<score>_f1``; it is the soft form of the same judgment (``1 - F1`` with o_edit for the
  scores that count answers *avoiding* o_edit, F1 with the unedited answer for the *unchanged* ones).
* **unchanged** (:func:`same_answer`): the normalised answer equals the unedited model's on the prompt.

Scores (:data:`kelight.types.WILD_GROUPS`; per prompt 0/1, or F1 in [0, 1]; :func:`wild_items`):
``wild_ES``/``wild_PS``/``wild_RES``/``wild_Efficacy``/``wild_Generality``: the answer gives the group's
right target; ``wild_NS``/``wild_RS``/``wild_DNS``: it does not give o_edit, and ``<name>_same``: it is
unchanged; ``wild_Locality``: it is unchanged.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kelight.types import WILD_GROUPS

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: case folded, punctuation (ASCII and Unicode) removed, the articles
    a/an/the removed, whitespace collapsed.

    Example:
        >>> normalize_answer("  The U.S.  Navy's ship, an ark!")
        'us navys ship ark'
    """
    text = "".join(ch for ch in text.casefold() if not _punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def gives(answer: str, target: str) -> bool:
    """Whether the normalised ``target`` is a prefix of the normalised ``answer`` at a word boundary.

    Example:
        >>> gives("Paris, France", "Paris"), gives("Parisian food", "Paris"), gives("in Paris", "Paris")
        (True, False, False)
    """
    want = normalize_answer(target).split()
    return bool(want) and normalize_answer(answer).split()[: len(want)] == want


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token-F1 of the normalised words of ``answer`` against ``reference`` (1.0 when both are empty).

    Example:
        >>> round(token_f1("Paris, France", "Paris"), 4)  # precision 1/2, recall 1/1
        0.6667
    """
    got, want = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def same_answer(answer: str, reference: str) -> bool:
    """Whether two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(answer) == normalize_answer(reference)


@dataclass(frozen=True)
class WildAnswer:
    """One probe's generated answer and its judgments (a ``cases.jsonl`` entry under ``"wild"``).

    Attributes:
        group: the probe or token group (a key of :data:`~kelight.types.WILD_GROUPS`).
        prompt: the probe prompt (before any ``wild_template``).
        target: what the answer is matched against: the group's right target, or o_edit for the groups
            whose answers should avoid it (NS, RS, DNS); the true answer for locality (shown, not scored).
        answer: the generated answer.
        match: whether the answer gives ``target`` (:func:`gives`).
        f1: :func:`token_f1` of the answer against ``target``.
        unedited: the unedited model's answer, for the groups compared with it (else ``None``).
        same: whether the answer equals ``unedited`` (:func:`same_answer`), or ``None``.
        same_f1: :func:`token_f1` against ``unedited``, or ``None``.
    """

    group: str
    prompt: str
    target: str
    answer: str
    match: bool
    f1: float
    unedited: str | None = None
    same: bool | None = None
    same_f1: float | None = None

    def as_row(self) -> dict[str, object]:
        """The entry as written to ``cases.jsonl`` (the ``unedited``/``same`` keys only where compared)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("unedited", "same", "same_f1")}


def judge(group: str, prompt: str, target: str, answer: str, unedited: str | None = None) -> WildAnswer:
    """Judge ``answer`` against ``target`` (and against the unedited model's answer, when given)."""
    same = None if unedited is None else same_answer(answer, unedited)
    same_f1 = None if unedited is None else token_f1(answer, unedited)
    return WildAnswer(group, prompt, target, answer, gives(answer, target), token_f1(answer, target), unedited,
                      same, same_f1)


def _metric_names() -> tuple[str, ...]:
    names = []
    for name, kind in WILD_GROUPS.values():
        names += [name, f"{name}_f1"] + ([f"{name}_same", f"{name}_same_f1"] if kind == "avoids" else [])
    return tuple(names)


#: Every wild metric in report order: per group its exact-match score, ``_f1``, and ``_same`` (+ ``_f1``).
WILD_METRICS: tuple[str, ...] = _metric_names()
#: The exact-match scores (no ``_f1``), the columns of ``kelight report``.
WILD_SCORES: tuple[str, ...] = tuple(m for m in WILD_METRICS if not m.endswith("_f1"))


def count_key(metric: str) -> str:
    """The ``cases.jsonl`` key of the prompt count behind a wild metric: ``n_wild_NS`` for ``wild_NS`` and
    ``wild_NS_f1``, ``n_wild_NS_same`` for ``wild_NS_same`` and ``wild_NS_same_f1``."""
    return "n_" + metric.removesuffix("_f1")


def wild_items(answers: Sequence[WildAnswer]) -> dict[str, list[float]]:
    """Per-prompt values of every wild metric the answers inform (0/1, or F1 in [0, 1]), in answer order.

    Raises:
        ValueError: an answer of a group without a wild score, or one compared with nothing where it must be.
    """
    items: dict[str, list[float]] = {}

    def add(name: str, value: bool | None, f1: float | None) -> None:
        if value is None or f1 is None:
            raise ValueError(f"expected the unedited model's answer for {name}, got none; judge the answer with "
                             f"unedited=...")
        items.setdefault(name, []).append(float(value))
        items.setdefault(f"{name}_f1", []).append(float(f1))

    for a in answers:
        if a.group not in WILD_GROUPS:
            raise ValueError(f"expected an answer of one of {sorted(WILD_GROUPS)}, got group {a.group!r}")
        name, kind = WILD_GROUPS[a.group]
        if kind == "gives":
            add(name, a.match, a.f1)
        elif kind == "avoids":
            add(name, not a.match, 1.0 - a.f1)
            add(f"{name}_same", a.same, a.same_f1)
        else:
            add(name, a.same, a.same_f1)
    return items
