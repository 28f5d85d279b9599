"""Adapters: declared orientation matches the module's computation; unknown archs fail clearly."""

import pytest
import torch

from kelight.lm.hooks import trace
from kelight.models import adapter_for
from kelight.models.tiny import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_out_weight_as_linear_maps_key_to_value(family):
    model, tok = tiny_model(family)
    adapter = adapter_for(model)
    path = adapter.path("mlp_out", 1)
    ids = tok(["hello there"], return_tensors="pt").input_ids
    with trace(model, [path], inputs=True) as k, trace(model, [path]) as v:
        model(ids)
    module = model.get_submodule(path)
    bias = getattr(module, "bias", None)
    expected = k[path] @ adapter.out_weight_as_linear(model, 1).T + (0 if bias is None else bias)
    torch.testing.assert_close(v[path], expected, rtol=1e-5, atol=1e-6)
    assert adapter.n_layers(model) == 3


def test_unknown_architecture_names_supported_ones():
    model, _ = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(ValueError, match=r"unknown architecture 'mamba'.*gpt2"):
        adapter_for(model)


@pytest.mark.parametrize("layer", [-1, 3, 1.5, True, "1"])
def test_layer_out_of_range(layer):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        adapter_for(model).check_layer(model, layer)
