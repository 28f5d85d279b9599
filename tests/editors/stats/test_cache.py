"""The key-statistics cache files: every byte is covered by the checksum."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kelight.editors.stats.cache import load_moment, save_moment


def test_every_header_byte_is_covered_by_the_checksum(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bit flipped anywhere in the header (metadata in any order, e.g. the unchecked ``count``) is
    detected: the file is refused, never read as valid statistics."""
    fields = {"format": "f", "key": "k" * 16, "layer": "1", "n_tokens": "16"}
    mom2 = torch.eye(4)
    path = tmp_path / "stats.safetensors"
    save_moment(path, mom2, fields, count=1234)
    raw = path.read_bytes()
    assert torch.equal(load_moment(path, fields, 4), mom2)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    with caplog.at_level(logging.ERROR, logger="kelight.editors.stats.cache"):
        for i in range(8, header_end):
            path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :])
            assert load_moment(path, fields, 4) is None, f"a flip at header byte {i} went unnoticed"
