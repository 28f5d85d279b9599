"""Conversion cache of packaged models: concurrent first loads must not break each other."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kelight.models import loading
from kelight.models.tiny import tiny_model


def _complete(d: Path, marker: str) -> None:
    d.mkdir(parents=True)
    (d / "config.json").write_text(marker)


def test_publish_dir_keeps_the_first_complete_copy(tmp_path: Path) -> None:
    target = tmp_path / "m"
    first, second = tmp_path / "a.partial", tmp_path / "b.partial"
    _complete(first, "first")
    _complete(second, "second")
    loading._publish_dir(first, target)
    loading._publish_dir(second, target)  # lost the race: no error, the winner's copy stays
    assert (target / "config.json").read_text() == "first"


def test_publish_dir_replaces_an_interrupted_leftover(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_text("half")  # no config.json: an interrupted write
    new = tmp_path / "a.partial"
    _complete(new, "new")
    loading._publish_dir(new, target)
    assert (target / "config.json").read_text() == "new"
    assert not (target / "model.safetensors").exists()


def test_private_siblings_differ() -> None:
    target = Path("/x/models/smollm2")
    a, b = loading._private_sibling(target), loading._private_sibling(target)
    assert a != b and a.parent == b.parent == target.parent and a.name.startswith("smollm2.partial-")


def test_dequantise_when_another_process_finishes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second converter of the same GGUF ends without error and leaves no partial directory."""
    model, tok = tiny_model("llama")
    target = tmp_path / "models" / "smollm2-135m-abc"
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    real_save = type(tok).save_pretrained

    def save_then_lose_the_race(self, path, *args, **kwargs):  # another process publishes meanwhile
        out = real_save(self, path, *args, **kwargs)
        if not target.exists():
            _complete(target, "other process")
        return out

    monkeypatch.setattr(type(tok), "save_pretrained", save_then_lose_the_race)
    loading._dequantise_to_cache(tmp_path / "x.gguf", target)
    assert (target / "config.json").read_text() == "other process"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_dequantise_writes_a_loadable_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model("llama")
    target = tmp_path / "models" / "smollm2-135m-abc"
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    loading._dequantise_to_cache(tmp_path / "x.gguf", target)
    assert (target / "config.json").exists() and any(target.glob("*.safetensors"))
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@pytest.fixture
def packaged_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A packaged model "tiny-pack" whose conversion saves a tiny llama; returns the conversions made."""
    monkeypatch.setenv("KELIGHT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not a real gguf")
    monkeypatch.setitem(loading.PACKAGED, "tiny-pack", loading.PackagedModel("tiny-pack", lambda: gguf))
    conversions: list[Path] = []

    def convert(gguf: Path, target: Path) -> None:
        model, tok = tiny_model("llama")
        tmp = loading._private_sibling(target)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        loading._publish_dir(tmp, target)
        conversions.append(target)

    monkeypatch.setattr(loading, "_dequantise_to_cache", convert)
    return conversions


@pytest.mark.parametrize("damage", ["truncate_weights", "empty_weights", "truncate_tokenizer", "cut_large_tokenizer",
                                    "no_weights"])
def test_corrupt_model_cache_is_detected_and_rebuilt(
    damage: str, packaged_tiny: list[Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = loading.load("tiny-pack", device="cpu")
    expected = {k: v.clone() for k, v in first.state_dict().items()}  # its tensors may map the file damaged below
    (target,) = packaged_tiny
    weights, tokenizer = target / "model.safetensors", target / "tokenizer.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty_weights":
        weights.write_bytes(b"")
    elif damage in ("truncate_tokenizer", "cut_large_tokenizer"):
        tokenizer.write_text(tokenizer.read_text()[:100].rstrip("} \n"))
        if damage == "cut_large_tokenizer":  # checked for its end only, as a tokenizer.json of tens of MB
            monkeypatch.setattr(loading, "_PARSED_JSON_BYTES", 0)
    else:
        weights.unlink()
    with caplog.at_level(logging.WARNING, logger="kelight.models.loading"):
        again, _ = loading.load("tiny-pack", device="cpu")
    assert packaged_tiny == [target, target]
    assert any(str(target) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    named = {"truncate_tokenizer": "unreadable: tokenizer.json (", "no_weights": "missing its *.safetensors",
             "cut_large_tokenizer": "unreadable: tokenizer.json (cut off before its end)"}
    assert any(named.get(damage, "unreadable: model.safetensors") in r.getMessage() for r in caplog.records)
    assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # the damaged copy is gone


def test_intact_model_cache_is_not_rebuilt(packaged_tiny: list[Path]) -> None:
    loading.load("tiny-pack", device="cpu")
    loading.load("tiny-pack", device="cpu")
    assert len(packaged_tiny) == 1


def test_an_unknown_model_says_what_is_accepted(monkeypatch):
    import pytest
    import transformers

    from kelight.models import loading
    from kelight.types import EditInputError

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(EditInputError, match=r"could not load the model 'someone/nosuch': expected one of "
                                             r"\['gemma3-270m', 'smollm2-135m'\] .*hub ids need internet access.*"
                                             r"transformers said: We couldn't connect"):
        loading.load("someone/nosuch")
