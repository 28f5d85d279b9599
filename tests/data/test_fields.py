"""Record field readers: each error names the record, its case id, the key and the fix."""

from __future__ import annotations

import pytest

from kelight.data.fields import is_list, read_field, read_pairs, read_text, same_text, where
from kelight.types import EditInputError


def test_where_names_the_case_id_when_there_is_one() -> None:
    assert where(3, {"case_id": 17}) == "record 3 (case_id 17)"
    assert where(3, {}) == "record 3"
    assert where(3, ["not", "a", "mapping"]) == "record 3"  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "", "   ", 5, ["x"]])
def test_read_text_refuses_what_is_not_a_non_empty_string(value: object) -> None:
    expected = r"record 2 \(case_id 9\): key 'a.b': expected a non-empty string.*give it"
    with pytest.raises(EditInputError, match=expected):
        read_text(value, 2, {"case_id": 9}, "a.b")


def test_read_field_treats_none_as_missing_and_lists_the_keys_present() -> None:
    expected = r"key 'prompt': missing; add 'prompt' \(keys present: \['prompt', 'x'\]\)"
    with pytest.raises(EditInputError, match=expected):
        read_field({"prompt": None, "x": 1}, "prompt", 0)
    assert read_field({"prompt": "Paris is"}, "prompt", 0) == "Paris is"


def test_read_pairs() -> None:
    rec = {"b": {"prompts": ["p1", "p2"], "targets": ["t1", "t2"]}}
    assert read_pairs(rec, "b", 0) == [("p1", "t1"), ("p2", "t2")]
    assert read_pairs(rec, "absent", 0) == []
    with pytest.raises(EditInputError, match="2 prompts but 1 targets; give exactly one target per prompt"):
        read_pairs({"b": {"prompts": ["p1", "p2"], "targets": ["t1"]}}, "b", 0)
    with pytest.raises(EditInputError, match=r"key 'b': expected \{'prompts'.*give two lists of strings"):
        read_pairs({"b": {"prompts": "p1", "targets": ["t1"]}}, "b", 0)
    with pytest.raises(EditInputError, match=r"key 'b.targets\[1\]': expected a non-empty string"):
        read_pairs({"b": {"prompts": ["p1", "p2"], "targets": ["t1", ""]}}, "b", 0)


def test_same_text_and_is_list() -> None:
    assert same_text(" Paris ", "paris") and not same_text("Paris", "Rome")
    assert is_list(("a",)) and is_list(["a"]) and not is_list("ab") and not is_list(None)
