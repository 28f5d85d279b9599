"""Architecture adapters as data: where the layers, MLP and attention live in each family.

An adapter is chosen by ``config.model_type``; nothing is guessed from module names or weight
shapes. ``mlp_out_conv1d`` declares GPT-2's transposed ``Conv1D`` (weight stored ``(in, out)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from kelight.types import EditInputError


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths (``{}`` = layer index) and facts of one architecture family.

    Attributes:
        layers: path of the ``nn.ModuleList`` of decoder blocks.
        mlp: path of a block's MLP module.
        mlp_in: FFN input ("key") matrix: rows are key vectors (``up_proj``/``fc_in``/``c_fc``).
        mlp_out: FFN output matrix whose input is the key k and output the value v.
        attn: path of a block's self-attention module.
        mlp_conv1d: whether ``mlp_in``/``mlp_out`` are GPT-2 ``Conv1D`` (weight ``(in, out)``).
        gate: path of the gate projection for gated MLPs (frozen by PathEdit), or ``None``.
        mlp_post_norm: path of the norm applied to the MLP output before it joins the residual
            stream (Gemma-2/3's ``post_feedforward_layernorm``), or ``None`` when the MLP output is
            added as it is. MEMIT writes residual changes through it (:mod:`kelight.editors.memit`).
        n_layers_attr / n_heads_attr / n_kv_heads_attr: config attribute names.
    """

    family: str
    layers: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    mlp_conv1d: bool = False
    gate: str | None = None
    mlp_post_norm: str | None = None
    n_layers_attr: str = "num_hidden_layers"
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"

    def block_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def path(self, which: str, layer: int) -> str:
        """Full module path of ``which`` (``"mlp"``, ``"mlp_in"``, ``"mlp_out"``, ``"attn"``...)."""
        sub = getattr(self, which)
        if sub is None:
            raise ValueError(f"{self.family} has no {which!r} module")
        return f"{self.block_path(layer)}.{sub}"

    def n_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.n_layers_attr))

    def module(self, model: nn.Module, which: str, layer: int) -> nn.Module:
        self.check_layer(model, layer)
        return model.get_submodule(self.path(which, layer))

    def check_layer(self, model: nn.Module, layer: int) -> None:
        n = self.n_layers(model)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise EditInputError(
                f"layer {layer!r} is out of range for this {self.family} model with {n} layers; "
                f"expected an integer in [0, {n - 1}]"
            )

    def every_layer(self, model: nn.Module, which: str) -> list[nn.Module]:
        """Module ``which`` (e.g. ``"attn"``) of every layer, in layer order."""
        return [self.module(model, which, layer) for layer in range(self.n_layers(model))]

    def out_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        """Weight of ``mlp_out`` at ``layer``."""
        return self.module(model, "mlp_out", layer).weight

    def out_weight_as_linear(self, model: nn.Module, layer: int):
        """``mlp_out`` weight viewed as ``(d_out, d_in)`` = (value dim, key dim), a view."""
        return self.as_linear(self.out_weight(model, layer))

    def as_linear(self, tensor):
        """An ``mlp_in``/``mlp_out`` weight (or its gradient) in stored layout, viewed as ``(d_out, d_in)``.

        ``Conv1D`` stores ``(d_in, d_out)`` (declared by ``mlp_conv1d``); the result is a view, so
        in-place writes through it reach the stored tensor.
        """
        return tensor.T if self.mlp_conv1d else tensor


_LLAMA = ArchAdapter(
    family="llama",
    layers="model.layers",
    mlp="mlp",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attn="self_attn",
    gate="mlp.gate_proj",
)

ADAPTERS: Mapping[str, ArchAdapter] = MappingProxyType(
    {
        "llama": _LLAMA,
        "mistral": _LLAMA,
        "qwen2": _LLAMA,
        "qwen3": _LLAMA,
        "gemma3_text": ArchAdapter(
            family="gemma3",
            layers="model.layers",
            mlp="mlp",
            mlp_in="mlp.up_proj",
            mlp_out="mlp.down_proj",
            attn="self_attn",
            gate="mlp.gate_proj",
            mlp_post_norm="post_feedforward_layernorm",
        ),
        "gpt2": ArchAdapter(
            family="gpt2",
            layers="transformer.h",
            mlp="mlp",
            mlp_in="mlp.c_fc",
            mlp_out="mlp.c_proj",
            attn="attn",
            mlp_conv1d=True,
            n_layers_attr="n_layer",
            n_heads_attr="n_head",
            n_kv_heads_attr=None,
        ),
        "gptj": ArchAdapter(
            family="gptj",
            layers="transformer.h",
            mlp="mlp",
            mlp_in="mlp.fc_in",
            mlp_out="mlp.fc_out",
            attn="attn",
            n_layers_attr="n_layer",
            n_heads_attr="n_head",
            n_kv_heads_attr=None,
        ),
        "gpt_neox": ArchAdapter(
            family="gpt_neox",
            layers="gpt_neox.layers",
            mlp="mlp",
            mlp_in="mlp.dense_h_to_4h",
            mlp_out="mlp.dense_4h_to_h",
            attn="attention",
            n_kv_heads_attr=None,
        ),
    }
)
ADAPTERS_ALIASES: Mapping[str, str] = MappingProxyType({"gemma3": "gemma3_text"})


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model.config.model_type``, or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    model_type = ADAPTERS_ALIASES.get(model_type, model_type)
    if model_type not in ADAPTERS:
        raise EditInputError(
            f"unknown architecture {model_type!r}: kelight has adapters for {sorted(ADAPTERS)}; "
            f"add an ArchAdapter entry for it in kelight/models/adapters.py"
        )
    return ADAPTERS[model_type]
