"""Edit requests: built from dicts with the expected keys; empty and conflicting joint batches refused."""

import pytest

from kelight.types import EditInputError, EditRequest, check_joint_requests, require_requests

REQ = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id="eiffel")


def test_from_dict_builds_the_request():
    record = {"prompt": REQ.prompt, "subject": REQ.subject, "target_new": "Rome", "target_true": "Paris",
              "case_id": "eiffel"}
    assert EditRequest.from_dict(record) == REQ


@pytest.mark.parametrize(("record", "match"), [
    ({"prompt": REQ.prompt, "subject": REQ.subject}, r"missing \['target_new'\] \(add them\)"),
    ({"prompt": REQ.prompt, "subject": REQ.subject, "target_new": "Rome", "target": "x"},
     r"unknown \['target'\] \(rename or drop them\)"),
    ({"prompt": REQ.prompt, "target_new": "Rome", "subj": "x", "case_id": 7},
     r"case 7: .*missing \['subject'\] \(add them\) and unknown \['subj'\]"),
])
def test_from_dict_names_the_expected_and_the_bad_keys(record, match):
    expected = r"expected an edit request with keys \['prompt', 'subject', 'target_new'\] \(optional: " \
               r"\['target_true', 'case_id', 'relation_id'\]\)"
    with pytest.raises(EditInputError, match=expected):
        EditRequest.from_dict(record)
    with pytest.raises(EditInputError, match=match):
        EditRequest.from_dict(record)


def test_empty_request_list_is_refused():
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        require_requests([])
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        check_joint_requests([])


def test_conflicting_targets_in_one_joint_batch_are_refused():
    other = EditRequest("Mount Fuji is in", "Mount Fuji", "Peru")
    berlin = EditRequest(REQ.prompt, REQ.subject, "Berlin", case_id="eiffel-2")
    with pytest.raises(EditInputError, match=r"requests 0 and 2 \(cases 'eiffel', 'eiffel-2'\) .* subject "
                                             r"'Eiffel Tower' to different targets \('Rome', 'Berlin'\); "
                                             r"edit them in turn .* or drop one \(in `kelight fit`: "
                                             r"--data.drop_conflicting true keeps the first\)"):
        check_joint_requests([REQ, other, berlin])


def test_duplicates_and_other_subjects_pass():
    check_joint_requests([REQ, REQ, EditRequest(REQ.prompt, REQ.subject, " Rome")])  # the same target
    check_joint_requests([REQ, EditRequest("The Eiffel Tower is in", "Tower", "Berlin")])  # another subject


def test_relation_id_is_optional_and_must_be_text():
    assert EditRequest.from_dict({"prompt": REQ.prompt, "subject": REQ.subject, "target_new": "Rome",
                                  "relation_id": "P131"}).relation_id == "P131"
    with pytest.raises(EditInputError, match="expected a non-empty string for relation_id"):
        EditRequest(REQ.prompt, REQ.subject, "Rome", relation_id="")
