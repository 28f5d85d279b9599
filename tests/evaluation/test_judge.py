"""Judging generated answers: the normaliser, prefix exact match, token-F1 and the wild scores."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import kelight.evaluation.judge
from kelight.evaluation.judge import (
    WILD_METRICS,
    WILD_SCORES,
    count_key,
    gives,
    judge,
    normalize_answer,
    same_answer,
    token_f1,
    wild_items,
)
from kelight.evaluation.metrics import EditMetrics, TokenAccuracy, WildScore
from kelight.evaluation.scoring import CaseResult


@pytest.mark.parametrize(("text", "expected"), [
    ("Paris", "paris"),
    ("  The  Eiffel\tTower\n", "eiffel tower"),  # article, whitespace
    ("an Apple a day", "apple day"),
    ("U.S. Navy's", "us navys"),  # punctuation removed, not replaced (SQuAD)
    ("Théâtre «Molière» — Paris!", "théâtre molière paris"),  # Unicode punctuation too
    ("Then there", "then there"),  # "the" only as a word
    ("STRASSE", "strasse"), ("Straße", "strasse"),  # case folded
    ("", ""), ("The.", ""),
])
def test_normalize_answer_hand_values(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(("answer", "target", "expected"), [
    ("Paris", "Paris", True),
    ("Paris, France", "Paris", True),  # the target starts the answer
    ("the city of Paris", "Paris", False),  # ... and nowhere else
    ("Parisian cuisine", "Paris", False),  # at a word boundary
    ("paris.", "Paris", True),
    ("The Netherlands is", "Netherlands", True),  # articles dropped on both sides
    ("New York City", "New York", True),
    ("New", "New York", False),  # the whole target
    ("Rolls-Royce cars", "Rolls-Royce", True),
    ("anything", "The", False),  # a target that normalises to nothing is given by no answer
    ("", "Paris", False),
])
def test_gives_is_a_prefix_at_a_word_boundary(answer: str, target: str, expected: bool) -> None:
    assert gives(answer, target) is expected


@pytest.mark.parametrize(("answer", "reference", "expected"), [
    ("Paris, France", "Paris", 2 * 0.5 * 1.0 / 1.5),  # precision 1/2, recall 1
    ("the cat sat", "cat sat on mat", 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 2/4
    ("red red blue", "red blue blue", 2 / 3),  # common counts are per word: min(2,1) + min(1,2)
    ("Rome", "Paris", 0.0),
    ("The", "a", 1.0),  # both empty after normalisation
    ("", "Paris", 0.0),
    ("Paris", "PARIS!", 1.0),
])
def test_token_f1_hand_values(answer: str, reference: str, expected: float) -> None:
    assert token_f1(answer, reference) == pytest.approx(expected, abs=1e-12)


def test_same_answer_compares_normalised_texts() -> None:
    assert same_answer("The Louvre.", "louvre")
    assert not same_answer("Louvre museum", "Louvre")


def _answers() -> list:
    return [
        judge("rewrite", "p0", "Rome", "Rome, Italy"),  # gives: 1, F1 2/3
        judge("paraphrase", "p1", "Rome", "Paris"),  # 0, F1 0
        judge("paraphrase", "p2", "Rome", "rome"),  # 1, F1 1
        judge("neighbor", "p3", "Rome", "Paris", unedited="Paris"),  # avoids o_edit: 1, F1 1; same: 1, 1
        judge("neighbor", "p4", "Rome", "Rome", unedited="Paris"),  # gives o_edit: 0, F1 0; changed: 0, 0
        judge("locality", "p5", "Paris", "Lyon France", unedited="Lyon"),  # changed: 0, F1 2/3
    ]


def test_wild_items_follow_the_groups_judgments() -> None:
    items = wild_items(_answers())
    assert items["wild_ES"] == [1.0] and items["wild_ES_f1"] == pytest.approx([2 / 3])
    assert items["wild_PS"] == [0.0, 1.0] and items["wild_PS_f1"] == [0.0, 1.0]
    assert items["wild_NS"] == [1.0, 0.0] and items["wild_NS_f1"] == [1.0, 0.0]  # 1 - F1 with o_edit
    assert items["wild_NS_same"] == [1.0, 0.0] and items["wild_NS_same_f1"] == [1.0, 0.0]
    assert items["wild_Locality"] == [0.0] and items["wild_Locality_f1"] == pytest.approx([2 / 3])
    assert set(items) <= set(WILD_METRICS)
    assert wild_items([]) == {}


def test_wild_items_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="expected the unedited model's answer for wild_NS_same"):
        wild_items([judge("neighbor", "p", "Rome", "Paris")])
    with pytest.raises(ValueError, match="got group 'commonsense'"):
        wild_items([judge("commonsense", "p", "yes", "yes")])


def test_answer_rows_keep_the_comparison_only_where_made() -> None:
    given, compared = judge("rewrite", "p0", "Rome", "Rome"), judge("neighbor", "p3", "Rome", "Paris", "Paris")
    assert given.as_row() == {"group": "rewrite", "prompt": "p0", "target": "Rome", "answer": "Rome", "match": True,
                              "f1": 1.0}
    assert compared.as_row()["unedited"] == "Paris" and compared.as_row()["same"] is True


def test_metric_names_and_counts() -> None:
    assert WILD_SCORES == ("wild_ES", "wild_PS", "wild_NS", "wild_NS_same", "wild_RS", "wild_RS_same", "wild_DNS",
                           "wild_DNS_same", "wild_RES", "wild_Efficacy", "wild_Generality", "wild_Locality")
    assert len(WILD_METRICS) == 2 * len(WILD_SCORES)
    assert count_key("wild_NS_f1") == count_key("wild_NS") == "n_wild_NS"
    assert count_key("wild_NS_same_f1") == "n_wild_NS_same"


def test_wild_score_pools_prompts_and_shares_the_token_accuracies_interval() -> None:
    cases = [[1.0, 0.0, 1.0], [1.0], [0.0, 0.0]]
    wild, tokens = WildScore(), TokenAccuracy()
    for values in cases:  # one update per case, as EditMetrics does
        wild.update(torch.tensor(values))
        tokens.update([torch.tensor([1])] * len(values), [torch.tensor([int(v)]) for v in values])
    got, same_items = wild.compute(), tokens.compute()
    assert float(got["mean"]) == pytest.approx(3 / 6) and int(got["n"]) == 6
    assert float(got["ci"]) == pytest.approx(float(same_items["ci"]))  # one interval rule for per-prompt means
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(WildScore().compute()["mean"]))


def test_edit_metrics_report_each_wild_key_with_its_interval() -> None:
    metrics = EditMetrics()
    metrics.update(CaseResult(0, wild=tuple(_answers()[:3])))
    metrics.update(CaseResult(1, wild=tuple(_answers()[3:])))
    out = metrics.compute()
    assert out["wild_ES"] == 100.0 and out["wild_ES_f1"] == pytest.approx(100 * 2 / 3)
    assert out["wild_PS"] == 50.0 and out["wild_NS"] == 50.0 and out["wild_NS_same"] == 50.0
    assert out["wild_Locality"] == 0.0 and out["wild_Locality_f1"] == pytest.approx(100 * 2 / 3)
    scores = {k for k in out if not k.endswith(("_ci", "_lo", "_hi"))}
    assert scores == {"wild_ES", "wild_ES_f1", "wild_PS", "wild_PS_f1", "wild_NS", "wild_NS_f1", "wild_NS_same",
                      "wild_NS_same_f1", "wild_Locality", "wild_Locality_f1"}  # no teacher-forced key without its data
    assert all(f"{k}_ci" in out for k in scores)
    teacher = CaseResult(2, {"rewrite": (torch.tensor([0.1]), torch.tensor([2.0]))})
    plain = EditMetrics()
    plain.update(teacher)
    assert not any(k.startswith("wild_") for k in plain.compute())


def test_doctests() -> None:
    assert doctest.testmod(kelight.evaluation.judge, raise_on_error=True).failed == 0
