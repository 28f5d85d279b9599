"""The zsre format: EasyEdit's reading (src → alt), its quirks (empty alt, spaces, alt == answers[0]) and every
malformed-record error; the real first 1,500 records when the shared data are present."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import kelight
from kelight.data import EditDataModule, default_data_root, detect_format, parse_record, parse_records, parse_zsre
from kelight.data.formats import EMPTY_ALT, drop_reason
from kelight.models.tiny import tiny_model
from kelight.types import EditInputError, ScoredPrompt, TokenProbe

SRC = "What university did Watts Humphrey attend?"
REPHRASE = "What university did Watts Humphrey take part in?"
LOC = "nq question: who played desmond doss father in hacksaw ridge"


def zsre_record(**changes: Any) -> dict[str, Any]:
    """The first record of ``zsre_mend_eval.json``, with ``changes`` (``None`` deletes a key)."""
    record = {
        "subject": "Watts Humphrey",
        "src": SRC,
        "pred": "Trinity College",
        "rephrase": REPHRASE,
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": LOC,
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || " + SRC,
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def test_edit_is_src_to_alt_with_answers0_as_the_true_target() -> None:
    skipped: Counter[str] = Counter()
    case = parse_zsre(zsre_record(), 12, skipped)
    request = case.request
    assert (request.prompt, request.subject, request.target_new, request.target_true, request.case_id) == (
        SRC, "Watts Humphrey", "University of Michigan", "Illinois Institute of Technology", 12)
    assert case.probes == {
        "rewrite": (ScoredPrompt(SRC, "University of Michigan", "Illinois Institute of Technology"),),
        "paraphrase": (ScoredPrompt(REPHRASE, "University of Michigan", "Illinois Institute of Technology"),),
    }  # no neighbour: loc is an unrelated question on which alt is no plausible answer
    assert case.token_probes == {
        "efficacy": (TokenProbe(SRC, "University of Michigan"),),
        "generality": (TokenProbe(REPHRASE, "University of Michigan"),),
        "locality": (TokenProbe(LOC, "Hugo Weaving"),),  # the "nq question: " prefix kept, as EasyEdit
    }
    assert case.source == "zsre" and case.generation_prompts == () and not skipped
    assert parse_zsre(zsre_record(case_id="w7"), 12).case_id == "w7"


def test_targets_are_stripped_and_doubled_spaces_in_src_kept() -> None:
    src = "What kind of  occupation does Julio Anguita have?"  # record 122 of the real file
    case = parse_zsre(zsre_record(subject="Julio Anguita", src=src, alt=" species", answers=["politician "],
                                  loc_ans=" Hugo Weaving"), 0)
    assert case.request.prompt == src and case.request.target_new == "species"
    assert case.request.target_true == "politician" and case.probes["rewrite"][0] == ScoredPrompt(src, "species",
                                                                                                   "politician")
    assert case.token_probes["locality"][0].target == "Hugo Weaving"


@pytest.mark.parametrize(("alt", "answers"), [("male", ["male"]), (" Delaware River", ["Delaware River"]),
                                              ("Germany", ["germany", "Prussia"])])
def test_alt_equal_to_the_true_answer_keeps_the_token_probes_without_a_pair(alt: str, answers: list[str]) -> None:
    """An edit that writes the true answer: EditRequest would refuse target_new == target_true, and a teacher-forced
    pair of one target against itself measures nothing. The case stays (its token accuracies are EasyEdit's)."""
    skipped: Counter[str] = Counter()
    case = parse_zsre(zsre_record(alt=alt, answers=answers), 3, skipped)
    assert case.request.target_true is None and case.request.target_new == alt.strip()
    assert case.probes == {} and skipped == Counter({"rewrite": 1, "paraphrase": 1})
    assert set(case.token_probes) == {"efficacy", "generality", "locality"}


def test_alt_equal_to_a_later_answer_is_still_an_edit() -> None:
    case = parse_zsre(zsre_record(alt="historian", answers=["bibliographer", "historian"]), 957)  # as record 957
    assert case.request.target_true == "bibliographer" and len(case.probes["rewrite"]) == 1


def test_empty_alt_is_refused_alone_and_left_out_of_a_data_set(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(EditInputError, match=r"record 54: key 'alt': expected a non-empty string, got ''"):
        parse_zsre(zsre_record(alt=""), 54)
    records = [zsre_record(), zsre_record(alt=""), zsre_record(alt="  ", src="What is the sex of Watts Humphrey?")]
    assert [drop_reason(r) for r in records] == [None, EMPTY_ALT, EMPTY_ALT]
    dropped: dict[str, list[int]] = {}
    cases = parse_records(records, [10, 11, 12], dropped=dropped)
    assert [c.case_id for c in cases] == [10] and dropped == {EMPTY_ALT: [11, 12]}
    with pytest.raises(EditInputError, match=r"none of the 2 selected records holds an edit \(left out 2 record"):
        parse_records(records[1:], [11, 12])
    assert drop_reason({"prompt": "x", "target_new": "", "alt": ""}) is None  # counterfact_edit: an error instead


def test_data_module_reports_the_records_it_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([zsre_record(), zsre_record(alt=""), zsre_record(alt="male", answers=["male"])]))
    data = EditDataModule(path=str(path), format="zsre")
    with caplog.at_level(logging.INFO):
        data.setup()
    assert [c.case_id for c in data.cases] == [0, 2] and data.dropped == {EMPTY_ALT: [1]}
    assert data.skipped == {"rewrite": 1, "paraphrase": 1}
    assert "left out 1 record(s): 1 zsre record(s) with an empty 'alt'" in caplog.text
    assert "(records [1])" in caplog.text and "skipped 2 unscoreable prompts" in caplog.text
    two = EditDataModule(path=str(path), limit=2)  # limit counts file records, kept or left out
    two.setup()
    assert [c.case_id for c in two.cases] == [0]
    assert [c.case_id for c in kelight.load_cases(path, format="zsre", skip=1)] == [2]


def test_detection_and_explicit_format() -> None:
    assert detect_format(zsre_record()) == "zsre"
    assert parse_record(zsre_record(), 0).source == "zsre"
    assert parse_record(zsre_record(), 0, format="zsre").source == "zsre"
    with pytest.raises(EditInputError, match=r"cannot tell the record format .*'src'.* \(zsre\)"):
        detect_format({"question": "q"})
    with pytest.raises(EditInputError, match=r"record 0: key 'src': missing"):
        parse_record(zsre_record(src=None), 0, format="zsre")
    with pytest.raises(EditInputError, match=r"expected format 'auto' or .* or 'zsre', got 'mend'"):
        parse_record(zsre_record(), 0, format="mend")  # type: ignore[arg-type]
    with pytest.raises(EditInputError, match=r"expected format 'auto' or .* or 'zsre', got 'mend'"):
        EditDataModule(format="mend")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"answers": None}, r"record 8: key 'answers': missing; add 'answers'"),
        ({"answers": "Illinois"}, r"record 8: key 'answers': expected a non-empty list of strings, got 'Illinois'"),
        ({"answers": []}, r"key 'answers': expected a non-empty list of strings, got \[\]; give a list"),
        ({"answers": [3]}, r"record 8: key 'answers\[0\]': expected a non-empty string, got 3"),
        ({"answers": ["x", ""]}, r"key 'answers\[1\]': expected a non-empty string"),
        ({"subject": "Watts Humphreys"}, r"record 8: key 'subject': subject 'Watts Humphreys' does not occur in "
                                         r"prompt .*literally"),
        ({"subject": None}, r"record 8: key 'subject': missing; add 'subject'"),
        ({"alt": None}, r"record 8: key 'alt': missing"),
        ({"alt": ["Michigan"]}, r"record 8: key 'alt': expected a non-empty string, got \['Michigan'\]"),
        ({"rephrase": 7}, r"record 8: key 'rephrase': expected a non-empty string, got 7; give it"),
        ({"loc": None}, r"record 8: key 'loc': missing"),
        ({"loc_ans": ""}, r"record 8: key 'loc_ans': expected a non-empty string"),
        ({"case_id": 40, "loc_ans": " "}, r"record 8 \(case_id 40\): key 'loc_ans'"),
    ],
)
def test_malformed_records_name_the_record_the_key_and_the_fix(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(EditInputError, match=match):
        parse_record(zsre_record(**changes), 8)


def test_malformed_record_fails_before_editing_in_a_data_set(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([zsre_record(), zsre_record(answers=[])]))
    with pytest.raises(EditInputError, match=r"record 1: key 'answers': expected a non-empty list"):
        kelight.load_cases(path)


def test_evaluate_scores_the_three_token_groups_and_the_two_pairs() -> None:
    model, tok = tiny_model("llama")
    cases = [parse_zsre(zsre_record(), 0), parse_zsre(zsre_record(alt="male", answers=["male"]), 1)]
    before = kelight.unedited_predictions(model, tok, cases)
    out = kelight.evaluate(model, tok, cases, unedited=before)
    assert out["Locality"] == 100.0 and out["n_cases"] == 2.0  # the unedited model against itself
    assert {"Efficacy", "Generality", "ES", "PS"} <= set(out) and "NS" not in out
    assert out["ES"] in (0.0, 100.0)  # one pair (case 1 has none)


def test_real_first_1500_records() -> None:
    root = default_data_root()
    path = None if root is None else root / "zsre" / "zsre_mend_eval_first1500.json"
    if path is None or not path.is_file():
        pytest.skip("shared data not found (set KELIGHT_DATA or run from the repository)")
    data = EditDataModule(path=str(path))
    data.setup()
    assert len(data.cases) == 1494 and data.dropped == {EMPTY_ALT: [54, 103, 1101, 1135, 1289, 1377]}
    assert data.skipped == {"rewrite": 44, "paraphrase": 44}  # alt == answers[0]: 43 verbatim, 1 after strip
    assert sum(c.request.target_true is None for c in data.cases) == 44
    assert all(c.source == "zsre" and c.request.subject in c.request.prompt for c in data.cases)
    assert not any(c.request.target_new != c.request.target_new.strip() for c in data.cases)
    assert data.cases[53].case_id == 53 and data.cases[54].case_id == 55  # ids are file positions


def test_doctests() -> None:
    import doctest

    import kelight.data.formats

    assert doctest.testmod(kelight.data.formats, raise_on_error=True).failed == 0
