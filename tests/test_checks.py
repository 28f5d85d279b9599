"""The hyper-parameter checks every editor shares: each mistake named with the expected form."""

import pytest

from kelight.checks import check_context_templates, check_layer, check_layers, check_number
from kelight.types import EditInputError


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True, "1"])
def test_number_must_be_finite_and_non_negative(value):
    with pytest.raises(EditInputError, match=r"expected w to be a finite number ≥ 0, got .*; hint"):
        check_number("w", value, positive=False, hint="; hint")


def test_number_bounds():
    assert check_number("w", 0.0, positive=False) == 0.0
    assert check_number("eps", float("inf"), positive=True, allow_inf=True) == float("inf")
    with pytest.raises(EditInputError, match=r"eps to be a number > 0 \(inf allowed\), got 0"):
        check_number("eps", 0, positive=True, allow_inf=True)


@pytest.mark.parametrize(("value", "hint"), [("1", ""), (True, ""), (-1, ""), (1.0, ""),
                                             ([1], "MEMIT/PMET take layers")])
def test_layer_is_one_integer_index(value, hint):
    with pytest.raises(EditInputError, match=rf"expected layer to be one layer index, an integer ≥ 0 .*{hint}"):
        check_layer("layer", value)
    assert check_layer("layer", 0) == 0


@pytest.mark.parametrize(("value", "match"), [
    (1, r"layers to be a list of layer indices.*got 1; one layer is written \[1\]"),
    ("12", "layers to be a list of layer indices"),
    ([True, 2], "layers to be a list of layer indices"),
    ([1, "2"], "layers to be a list of layer indices"),
    ([], "non-empty ascending"),
    ([2, 1], "non-empty ascending"),
    ([1, 1], "distinct"),
])
def test_layers_are_an_ascending_list_of_indices(value, match):
    with pytest.raises(EditInputError, match=match):
        check_layers("layers", value)
    assert check_layers("layers", [0, 2]) == (0, 2)


@pytest.mark.parametrize(("value", "got"), [
    ([[5, -2]], r"\[5, -2\]"), ([[0, 2]], r"\[0, 2\]"), ([[-1, 2]], r"\[-1, 2\]"), ([[5]], r"\[5\]"),
    ([[5, 10, 1]], r"\[5, 10, 1\]"), ([[True, 2]], r"\[True, 2\]"), ([[5.0, 2]], r"\[5.0, 2\]"),
    ([(5, 10), None], "None"), (5, "5"), ("5,10", "'5,10'"),
])
def test_context_templates_are_pairs_of_positive_integers(value, got):
    with pytest.raises(EditInputError, match=rf"expected context_templates to be \[length, count\] pairs of positive "
                                             rf"integers.*got {got}"):
        check_context_templates(value)


def test_flat_context_templates_are_told_to_bracket_each_pair():
    with pytest.raises(EditInputError, match=r"got 5 in \[5, 10\]; write each pair in its own brackets"):
        check_context_templates([5, 10])


def test_context_templates_normalised_to_tuples():
    assert check_context_templates([[5, 10], (10, 10)]) == ((5, 10), (10, 10))
    assert check_context_templates([]) == ()
