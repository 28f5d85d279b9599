"""Record parsing: every probe group of both formats, and every malformed-record error."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from kelight.data import detect_format, parse_counterfact_edit, parse_counterfact_mix, parse_record
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS, EditInputError, ScoredPrompt, TokenProbe

REWRITE = "The Eiffel Tower is located in the city of"
PREFIX = f"{REWRITE} Rome. "


def mix_record() -> dict[str, Any]:
    """A counterfact_mix record with every key (a real one has one half's keys only)."""
    return {
        "requested_rewrite": {
            "prompt": REWRITE,
            "subject": "Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
            "relation_id": "P131",
        },
        "rewrite": {"prompts": [REWRITE], "targets": ["Rome"]},
        "p-paraphrase": {"prompts": ["The Eiffel Tower stands in"], "targets": ["Rome"]},
        "p-subject_alias": {"prompts": ["La tour Eiffel is in the city of"], "targets": ["Rome"]},
        "l-neighbor": {
            "prompts": ["The Louvre is located in the city of", "The Colosseum is located in the city of"],
            "targets": ["Paris", " rome "],  # the second equals target_new: unscoreable, skipped
        },
        "l-relation": {
            "prompts": ["The Eiffel Tower was designed by", "The Eiffel Tower is in"],
            "targets": ["Gustave Eiffel", "ROME"],  # the second equals target_new: skipped
        },
        "p-reasoning": {"prompts": ["The Eiffel Tower's city is the capital of"], "targets": ["Italy"]},
        "o-commonsense": {"prompts": "How do you boil water?", "right": "Heat it.", "wrong": "Freeze it."},
        "generation": {"prompts": ["The Eiffel Tower is", "Visitors to the Eiffel Tower"]},
    }


def edit_record() -> dict[str, Any]:
    return {
        "case_id": 7,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }


def test_mix_every_group() -> None:
    skipped: Counter[str] = Counter()
    case = parse_counterfact_mix(mix_record(), 3, skipped)
    assert case.case_id == 3 and case.source == "counterfact"
    assert set(case.probes) == set(PROBE_GROUPS)
    assert case.probes["rewrite"] == (ScoredPrompt(REWRITE, "Rome", "Paris"),)
    assert case.request.relation_id == "P131"  # read: the relation terms leave the edited relation out by it
    # PS is the paraphrases only; RES pools reasoning and subject-alias prompts (the reference's portability)
    assert case.probes["paraphrase"] == (ScoredPrompt("The Eiffel Tower stands in", "Rome", "Paris"),)
    assert case.probes["neighbor"] == (ScoredPrompt("The Louvre is located in the city of", "Paris", "Rome"),)
    assert case.probes["relation"] == (ScoredPrompt("The Eiffel Tower was designed by", "Gustave Eiffel", "Rome"),)
    assert case.probes["distracted_neighbor"] == (
        ScoredPrompt(
            "The Eiffel Tower is located in the city of Rome. The Louvre is located in the city of", "Paris", "Rome"
        ),
    )
    assert case.probes["reasoning"] == (
        ScoredPrompt("The Eiffel Tower's city is the capital of", "Italy", "Paris"),
        ScoredPrompt("La tour Eiffel is in the city of", "Rome", "Paris"),
    )
    assert case.probes["commonsense"] == (ScoredPrompt("How do you boil water?", "Heat it.", "Freeze it."),)
    assert case.probes["distracted_commonsense"] == (
        ScoredPrompt(
            "The Eiffel Tower is located in the city of Rome. How do you boil water?", "Heat it.", "Freeze it."
        ),
    )
    assert case.generation_prompts == ("The Eiffel Tower is", "Visitors to the Eiffel Tower")
    assert skipped == Counter({"neighbor": 1, "distracted_neighbor": 1, "relation": 1})
    assert case.token_probes == {}


def test_mix_wikidata_half_and_none_keys() -> None:
    record = mix_record()
    for key in ("p-paraphrase", "l-neighbor", "generation"):
        record[key] = None  # how `datasets` fills the keys of the other half
    record["l-relation"] = {"prompts": [], "targets": []}
    record["case_id"] = "wd-1"
    record["requested_rewrite"]["relation_id"] = None  # the WikiData half has none
    case = parse_counterfact_mix(record, 0)
    assert case.source == "wikidata" and case.case_id == "wd-1" and case.request.relation_id is None
    assert "neighbor" not in case.probes and "distracted_neighbor" not in case.probes
    assert "relation" not in case.probes  # empty groups are left out
    assert case.generation_prompts == ()
    assert case.probes["distracted_commonsense"][0].prompt.startswith(PREFIX)


def test_edit_format_both_metric_families() -> None:
    case = parse_counterfact_edit(edit_record(), 0)
    rec = edit_record()
    assert case.case_id == 7 and case.request.target_true == "French"
    assert set(case.token_probes) == set(TOKEN_GROUPS)
    assert case.token_probes["efficacy"] == (TokenProbe(rec["prompt"], "English"),)
    assert case.token_probes["generality"] == (TokenProbe(rec["rephrase_prompt"], "English"),)
    assert case.token_probes["locality"] == (TokenProbe(rec["locality_prompt"], "French"),)
    assert case.probes["rewrite"] == (ScoredPrompt(rec["prompt"], "English", "French"),)
    assert case.probes["paraphrase"] == (ScoredPrompt(rec["rephrase_prompt"], "English", "French"),)
    assert case.probes["neighbor"] == (ScoredPrompt(rec["locality_prompt"], "French", "English"),)


def test_edit_unscoreable_neighbor_is_skipped_but_token_probe_kept() -> None:
    rec = edit_record() | {"locality_ground_truth": "English"}
    skipped: Counter[str] = Counter()
    case = parse_counterfact_edit(rec, 0, skipped)
    assert "neighbor" not in case.probes and skipped == Counter({"neighbor": 1})
    assert case.token_probes["locality"] == (TokenProbe(rec["locality_prompt"], "English"),)


def test_detect_and_dispatch() -> None:
    assert detect_format(mix_record()) == "counterfact_mix"
    assert detect_format(edit_record()) == "counterfact_edit"
    assert parse_record(edit_record(), 0).source == "counterfact_edit"
    assert parse_record(mix_record(), 0, format="counterfact_mix").source == "counterfact"
    with pytest.raises(EditInputError, match=r"cannot tell the record format.*pass the format explicitly"):
        detect_format({"question": "q"})
    with pytest.raises(EditInputError, match=r"record 0: key 'requested_rewrite': missing"):
        parse_record(edit_record() | {"case_id": None}, 0, format="counterfact_mix")
    with pytest.raises(EditInputError, match=r"expected format 'auto'"):
        parse_record(edit_record(), 0, format="mend")  # type: ignore[arg-type]


def _mix_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    record = copy.deepcopy(mix_record())
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("requested_rewrite",), KeyError, r"record 4: key 'requested_rewrite': missing; add"),
        (("rewrite",), KeyError, r"record 4: key 'rewrite': missing"),
        (("requested_rewrite", "subject"), KeyError, r"key 'requested_rewrite.subject': missing"),
        (
            ("requested_rewrite", "subject"),
            "Big Ben",
            r"'requested_rewrite.subject'.*does not occur in prompt.*"
            r"literally",
        ),
        (("requested_rewrite", "target_new"), "  ", r"'requested_rewrite.target_new': expected a non-empty string"),
        (("requested_rewrite", "target_true"), "Rome", r"'requested_rewrite.target_new'.*equals target_true"),
        (("requested_rewrite",), "text", r"key 'requested_rewrite': expected a mapping"),
        (("requested_rewrite", "relation_id"), 131, r"key 'requested_rewrite.relation_id': expected a non-empty str"),
        (("l-neighbor", "targets"), ["Paris"], r"key 'l-neighbor': 2 prompts but 1 targets; give exactly one"),
        (("l-relation", "targets"), ["", "x"], r"key 'l-relation.targets\[0\]': expected a non-empty string"),
        (("p-paraphrase",), ["a prompt"], r"key 'p-paraphrase': expected \{'prompts'"),
        (("p-reasoning", "prompts"), "one prompt", r"key 'p-reasoning': expected \{'prompts'"),
        (("o-commonsense", "wrong"), KeyError, r"key 'o-commonsense.wrong': expected a non-empty string"),
        (("generation", "prompts"), [3], r"key 'generation.prompts\[0\]': expected a non-empty string"),
    ],
)
def test_mix_malformed(path: tuple[str, ...], value: Any, match: str) -> None:
    with pytest.raises(EditInputError, match=match):
        parse_counterfact_mix(_mix_with(path, value), 4)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("locality_prompt", None, r"record 5 \(case_id 7\): key 'locality_prompt': missing; add"),
        ("rephrase_prompt", None, r"key 'rephrase_prompt': missing"),
        ("ground_truth", "", r"key 'ground_truth': expected a non-empty string"),
        ("subject", "Edith Piaf", r"key 'subject': subject 'Edith Piaf' does not occur in prompt"),
        ("target_new", "French", r"key 'target_new'.*equals target_true"),
    ],
)
def test_edit_malformed(key: str, value: Any, match: str) -> None:
    record = edit_record()
    if value is None:
        del record[key]
    else:
        record[key] = value
    with pytest.raises(EditInputError, match=match):
        parse_counterfact_edit(record, 5)


def test_not_a_mapping() -> None:
    with pytest.raises(EditInputError, match=r"record 2: expected a JSON object, got list"):
        parse_counterfact_mix([], 2)  # type: ignore[arg-type]
    with pytest.raises(EditInputError, match=r"record 2: expected a JSON object, got str"):
        parse_counterfact_edit("x", 2)  # type: ignore[arg-type]
