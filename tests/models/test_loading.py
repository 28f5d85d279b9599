"""Conversion cache of packaged models: concurrent first loads must not break each other."""

from __future__ import annotations

from pathlib import Path

import pytest

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
