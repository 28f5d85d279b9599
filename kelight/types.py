"""Plain data types shared by every part of kelight.

An :class:`EditRequest` is the fact to change; an :class:`EditCase` bundles it with the probes
that measure the edit (rewrite, paraphrase, neighbourhood, ...). Both are frozen and validated on
construction, so a malformed record fails where it is read, with its id in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class EditInputError(ValueError):
    """A user-supplied edit request, record or option is malformed."""


def _require_text(value: object, what: str, case_id: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EditInputError(
            f"case {case_id!r}: expected a non-empty string for {what}, got {value!r}; "
            f"fix the record or drop it"
        )
    return value


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt`` (containing ``subject`` literally) → ``target_new``.

    Example:
        >>> r = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
        >>> r.subject_span()
        (4, 16)
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int = 0

    def __post_init__(self) -> None:
        _require_text(self.prompt, "the prompt", self.case_id)
        _require_text(self.subject, "the subject", self.case_id)
        _require_text(self.target_new, "target_new", self.case_id)
        if self.target_true is not None:
            _require_text(self.target_true, "target_true", self.case_id)
        if self.subject not in self.prompt:
            raise EditInputError(
                f"case {self.case_id!r}: subject {self.subject!r} does not occur in prompt "
                f"{self.prompt!r}; the prompt must contain the subject literally (not '{{}}')"
            )
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise EditInputError(
                f"case {self.case_id!r}: target_new equals target_true ({self.target_new!r}); "
                f"an edit must change the answer"
            )

    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the last occurrence of the subject in the prompt."""
        start = self.prompt.rindex(self.subject)
        return start, start + len(self.subject)


@dataclass(frozen=True)
class ScoredPrompt:
    """A teacher-forced comparison: is ``right`` more likely than ``wrong`` after ``prompt``?"""

    prompt: str
    right: str
    wrong: str


@dataclass(frozen=True)
class TokenProbe:
    """EasyEdit-style token accuracy probe: argmax predictions over ``target``'s tokens."""

    prompt: str
    target: str


# Probe group name -> (score metric, magnitude metric). Order is the order of reports.
PROBE_GROUPS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "rewrite": ("ES", "EM"),
        "paraphrase": ("PS", "PM"),
        "neighbor": ("NS", "NM"),
        "relation": ("RS", "RM"),
        "distracted_neighbor": ("DNS", "DNM"),
        "reasoning": ("RES", "REM"),
        "commonsense": ("OS", "OM"),
        "distracted_commonsense": ("DOS", "DOM"),
    }
)

# EasyEdit-style token-accuracy groups -> metric name.
TOKEN_GROUPS: Mapping[str, str] = MappingProxyType(
    {"efficacy": "Efficacy", "generality": "Generality", "locality": "Locality"}
)


@dataclass(frozen=True)
class EditCase:
    """An edit request together with everything used to evaluate it.

    Attributes:
        request: the fact to rewrite.
        probes: probe group (a key of ``PROBE_GROUPS``) -> scored prompts.
        token_probes: token group (a key of ``TOKEN_GROUPS``) -> token probes.
        generation_prompts: prompts for the fluency (n-gram entropy) metric.
        source: which half/format the case came from (e.g. ``"counterfact"``, ``"wikidata"``).
    """

    request: EditRequest
    probes: Mapping[str, tuple[ScoredPrompt, ...]] = field(default_factory=dict)
    token_probes: Mapping[str, tuple[TokenProbe, ...]] = field(default_factory=dict)
    generation_prompts: tuple[str, ...] = ()
    source: str = "builtin"

    def __post_init__(self) -> None:
        for name in self.probes:
            if name not in PROBE_GROUPS:
                raise EditInputError(
                    f"case {self.request.case_id!r}: unknown probe group {name!r}; "
                    f"expected one of {sorted(PROBE_GROUPS)}"
                )
        for name in self.token_probes:
            if name not in TOKEN_GROUPS:
                raise EditInputError(
                    f"case {self.request.case_id!r}: unknown token group {name!r}; "
                    f"expected one of {sorted(TOKEN_GROUPS)}"
                )

    @property
    def case_id(self) -> str | int:
        return self.request.case_id
