"""Corpus sources: a malformed corpus file or an unreachable hub name fails with the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kelight
from kelight.editors.stats.corpus import CorpusSpec, as_corpus
from kelight.editors.stats.moments import second_moment
from kelight.models.tiny import tiny_model
from kelight.types import EditRequest

FAST = {"progress": False, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("no_shared_data")  # the shared data stay hidden


def test_truncated_json_names_the_file_line_and_format(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(["first text of the file", "second text"])[:16])
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON at line 1, column \d+ "
                                         r"\(.*\); expected a corpus file with a JSON list of strings or of records"):
        second_moment(model, tok, 1, str(path), **FAST)


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a good first line"}) + "\n\n{\"text\": \"cut\n")
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"bad\.jsonl is not valid JSON at line 3, column 10 .*expected a corpus "
                                         r"file with one JSON string or record with a string 'text' per line"):
        second_moment(model, tok, 1, CorpusSpec(kind="file", path=str(path)), **FAST)


def test_edit_with_a_bad_corpus_file_leaves_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('["a text", "another')
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    request = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON.*expected a corpus file"):
        kelight.edit(model, tok, request, method="memit", layers=[0, 1], mom2_corpus=str(path), steps=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unreachable_hub_name_lists_the_builtin_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str, config: str | None, split: str) -> datasets.Dataset:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert as_corpus("wikitext") == CorpusSpec(kind="hub", name="wikitext")  # hub names stay accepted
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"hub dataset 'wikitext' .*Couldn't reach 'wikitext'.*expected 'auto', "
                                         r"'wikitext2', 'model', a \.txt/\.json/\.jsonl file path.*needs internet"
                       ) as info:
        second_moment(model, tok, 1, "wikitext", **FAST)
    assert isinstance(info.value.__cause__, ConnectionError)
