"""Plain data types shared by every part of kelight.

An :class:`EditRequest` is the fact to change; an :class:`EditCase` bundles it with the probes
that measure the edit (rewrite, paraphrase, neighbourhood, ...). Both are frozen and validated on
construction, so a malformed record fails where it is read, with its id in the message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
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

    ``relation_id`` (optional) names the edited relation by its WikiData id (e.g. ``"P27"``); the
    relation-preserving objective (:mod:`kelight.objectives.relations`) leaves that relation out.

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
    relation_id: str | None = None

    def __post_init__(self) -> None:
        _require_text(self.prompt, "the prompt", self.case_id)
        if self.relation_id is not None:
            _require_text(self.relation_id, "relation_id (a WikiData id such as 'P27', or None)", self.case_id)
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

    @classmethod
    def from_dict(cls, record: Mapping[str, object]) -> EditRequest:
        """``EditRequest(**record)``, refusing a missing or unknown key with the expected ones.

        Example:
            >>> EditRequest.from_dict({"prompt": "Paris is in", "subject": "Paris", "target_new": "Spain"}).subject
            'Paris'
        """
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in record]
        unknown = [k for k in record if k not in names]
        if missing or unknown:
            problems = ([f"missing {missing} (add them)"] if missing else []) + (
                [f"unknown {unknown} (rename or drop them)"] if unknown else [])
            raise EditInputError(
                f"case {record.get('case_id', 0)!r}: expected an edit request with keys {required} (optional: "
                f"{[k for k in names if k not in required]}), got {' and '.join(problems)}"
            )
        return cls(**record)  # type: ignore[arg-type]

    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the last occurrence of the subject in the prompt."""
        start = self.prompt.rindex(self.subject)
        return start, start + len(self.subject)


def require_requests(requests: Sequence[EditRequest]) -> None:
    """Refuse an empty request list (an edit of nothing is a caller's mistake, not a no-op)."""
    if not requests:
        raise EditInputError(
            "expected at least one edit request, got none; pass an EditRequest, a dict of its fields, "
            "or a non-empty list of them"
        )


def conflicting_pairs(requests: Sequence[EditRequest]) -> list[tuple[int, int]]:
    """``(i, j)`` for every request ``j`` that rewrites the prompt and subject of the earlier request
    ``i`` (the first with them) to another target; identical duplicates are not conflicts."""
    first: dict[tuple[str, str], int] = {}
    pairs = []
    for j, request in enumerate(requests):
        i = first.setdefault((request.prompt, request.subject), j)
        if requests[i].target_new.strip() != request.target_new.strip():
            pairs.append((i, j))
    return pairs


def split_at_conflicts(requests: Sequence[EditRequest]) -> list[int]:
    """Where a stream of joint edits must start a new edit so that none holds two requests that rewrite one prompt
    and subject to different targets: the index of every request that conflicts with one since the last start.

    Example:
        >>> a, b = EditRequest("Paris is in", "Paris", "Spain"), EditRequest("Rome is in", "Rome", "Peru")
        >>> split_at_conflicts([a, b, EditRequest("Paris is in", "Paris", "Chile"), a])
        [2, 3]
    """
    starts, start = [], 0
    while pairs := conflicting_pairs(requests[start:]):
        start += pairs[0][1]
        starts.append(start)
    return starts


def check_joint_requests(requests: Sequence[EditRequest]) -> None:
    """Refuse an empty joint batch, or two of its requests that rewrite one prompt and subject to
    different targets (one joint update cannot write both; identical duplicates pass)."""
    require_requests(requests)
    pairs = conflicting_pairs(requests)
    if pairs:
        i, j = pairs[0]
        a, b = requests[i], requests[j]
        raise EditInputError(
            f"requests {i} and {j} (cases {a.case_id!r}, {b.case_id!r}) of one joint edit rewrite the same prompt "
            f"{b.prompt!r} of subject {b.subject!r} to different targets ({a.target_new!r}, {b.target_new!r}); "
            "edit them in turn (ROME/FT, or the sequential regime) or drop one (in `kelight fit`: "
            "--data.drop_conflicting true keeps the first)"
        )


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

# The regimes that keep every edit until all cases are evaluated (one edit sequence, not independent edits).
KEEPING_REGIMES = ("sequential", "consecutive")

# EasyEdit-style token-accuracy groups -> metric name.
TOKEN_GROUPS: Mapping[str, str] = MappingProxyType(
    {"efficacy": "Efficacy", "generality": "Generality", "locality": "Locality"}
)

# Generated-answer ("wild") scores: probe or token group -> (metric name, what a good answer does):
# "gives" its right target, "avoids" o_edit (the group's wrong target; also scored as unchanged from the
# unedited model's answer, ``<name>_same``), or is "unchanged" from the unedited model's answer.
WILD_GROUPS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "rewrite": ("wild_ES", "gives"),
        "paraphrase": ("wild_PS", "gives"),
        "neighbor": ("wild_NS", "avoids"),
        "relation": ("wild_RS", "avoids"),
        "distracted_neighbor": ("wild_DNS", "avoids"),
        "reasoning": ("wild_RES", "gives"),
        "efficacy": ("wild_Efficacy", "gives"),
        "generality": ("wild_Generality", "gives"),
        "locality": ("wild_Locality", "unchanged"),
    }
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
