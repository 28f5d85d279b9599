"""``kelight analyze ...``: the fit config and overrides describe the edit; JSON + PNG come out."""

import json
from pathlib import Path

import pytest

from kelight.cli.main import run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs/smollm2/rome_sadr.yaml"), "--model.model_name", "tiny:llama",
        "--model.editor.layer", "1", "--model.editor.context_templates", "[[3, 1]]", "--model.editor.steps", "3",
        "--model.editor.mom2_adjustment", "false", "--data.limit", "2"]


@pytest.mark.parametrize(("name", "extra"), [
    ("drift", []),
    ("substitution", ["--window", "1", "--kinds", "attn,mlp"]),
    ("patching", ["--window", "2", "--tasks", "neighbor,distracted_neighbor"]),
    ("heads", []),
])
def test_analyze_writes_json_png_and_config(tmp_path, name, extra):
    assert run(["analyze", name, *TINY, *extra, "--out", str(tmp_path)]) is None
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result and (tmp_path / f"{name}.png").stat().st_size > 0
    assert "sadr_gamma: 0.08" in (tmp_path / "config.yaml").read_text()


def test_unknown_analysis_is_refused():
    with pytest.raises(SystemExit, match="drift|substitution|patching|heads"):
        run(["analyze", "attention"])


def test_heads_needs_sadr(tmp_path):
    plain = [a if not a.endswith("rome_sadr.yaml") else str(ROOT / "configs/smollm2/rome.yaml") for a in TINY]
    with pytest.raises(ValueError, match="sadr_gamma > 0"):
        run(["analyze", "heads", *plain, "--out", str(tmp_path)])


def test_a_case_index_outside_the_data_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"expected --case in 0\.\.1 \(the selected data has 2 cases\), got 2"):
        run(["analyze", "substitution", *TINY, "--case", "2", "--out", str(tmp_path)])


def test_malformed_layers_are_refused_with_the_format():
    from kelight.cli.analyze import _int_list

    assert _int_list("3:6") == [3, 4, 5] and _int_list("1, 4") == [1, 4]
    with pytest.raises(ValueError, match=r"expected --layers as 'lo:hi' or 'a,b,c', got '5:'"):
        _int_list("5:")
