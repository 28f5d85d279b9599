"""``kelight sweep`` checks a spec's parameters against its method's options before the first trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from kelight.cli.sweep import check_parameters, main
from kelight.types import EditInputError

ROOT = Path(__file__).resolve().parents[2]
SPEC = """method: grid
metric: {{name: fit/Avg.S, goal: maximize}}
parameters:
  {name}: {{values: [1, 2]}}
command: [kelight, fit, --config, {config}, "${{args}}"]
"""


@pytest.mark.parametrize("spec", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_names_options_of_its_method(spec, monkeypatch):
    monkeypatch.chdir(ROOT)  # the specs name their configs relative to the repository
    check_parameters(str(spec))


@pytest.mark.parametrize(("name", "match"), [
    ("model.editor.layerz", r"parameter 'model.editor.layerz' is not an option of rome \(kelight.ROME\); its options "
                            r"are model.editor.\{.*layer, .*\} \(kelight fit --model.help kelight.ROME\)"),
    ("model.sadr_gamma", r"parameter 'model.sadr_gamma' is not an option of rome .*its options are model.\{.*regime"
                         r".*method options are model.editor.\*: use 'model.editor.sadr_gamma'"),
])
def test_an_unknown_parameter_is_refused_before_any_trial(tmp_path, name, match, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(name=name, config=ROOT / "configs/smollm2/rome.yaml"))
    with pytest.raises(EditInputError, match=match):
        check_parameters(str(spec))
    with pytest.raises(SystemExit, match=r"^kelight sweep: .*is not an option of rome"):
        main([str(spec), "--count", "1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    spec.write_text(SPEC.format(name="model.editor.layer", config=ROOT / "configs/smollm2/rome.yaml"))
    check_parameters(str(spec))  # a known one passes
