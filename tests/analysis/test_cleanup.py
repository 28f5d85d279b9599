"""An analysis that fails midway leaves the model as it found it: weights bit-exact, no hooks, no
per-module attention state, the attention kernel switched back."""

import pytest

import kelight.analysis.drift
import kelight.analysis.patching
import kelight.analysis.substitution
from kelight.analysis.drift import attention_drift
from kelight.analysis.patching import attention_patching
from kelight.analysis.substitution import substitution_map

from .conftest import assert_unchanged, snapshot


class Boom(RuntimeError):
    pass


def _raising_on_call(real, n: int):
    calls = {"n": 0}

    def probabilities(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"call {n}")
        return real(*args, **kwargs)

    return probabilities


RUNS = {
    "drift": (kelight.analysis.drift, lambda m, t, cases, e: attention_drift(m, t, cases[1:2], e)),
    "patching": (kelight.analysis.patching, lambda m, t, cases, e: attention_patching(
        m, t, cases[:1], e, tasks=["distracted_neighbor"], window=2)),
    "substitution": (kelight.analysis.substitution,
                     lambda m, t, cases, e: substitution_map(m, t, cases[0], e, window=1, kinds=["attn"])),
}


@pytest.mark.parametrize(("name", "call"), [
    ("drift", 3),  # the edited model's first read-out
    ("patching", 1),  # while the vanilla attention is recorded
    ("patching", 3),  # edited, while vanilla weights replace the edited ones
    ("substitution", 2),  # edited, while its module outputs are traced
    ("substitution", 3),  # clean, while recorded outputs are substituted
])
def test_failure_midway_restores_everything(model_tok, cases, edit, monkeypatch, name, call):
    model, tok = model_tok
    module, run = RUNS[name]
    before = snapshot(model)
    implementation = model.config._attn_implementation
    monkeypatch.setattr(module, "probabilities", _raising_on_call(module.probabilities, call))
    with pytest.raises(Boom):
        run(model, tok, cases, edit)
    assert_unchanged(model, before)
    assert model.config._attn_implementation == implementation
    for path, sub in model.named_modules():
        ours = [h for h in sub._forward_hooks.values() if h.__module__.startswith("kelight")]  # not transformers'
        assert not ours, f"hook left on {path!r}"
        assert not any(k.startswith("_kelight_attn") for k in vars(sub)), f"attention state left on {path!r}"
