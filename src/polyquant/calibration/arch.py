"""Architecture knowledge for the sequential driver, kept as data: inside one repeated block,
which Linears are quantized together ("true sequential" groups), in which order, and which
module produces their input (``feeds``: what an input-scaling method such as AWQ would fold into)
and whether that fold is exact (``scalable``).

One table of layouts (names relative to the block) and one table mapping ``config.model_type`` to a
layout. A model type that is not listed gets the first layout whose names cover the block's
Linears; failing that, the generic fallback: every Linear of the block in module order, one group
each. Linears a layout does not name are appended as groups of their own, in module order.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Group", "LAYOUTS", "MODEL_TYPES", "block_groups", "layout_for"]


@dataclass(frozen=True)
class Group:
    """Linears (names relative to the block) quantized together, and the module feeding them.

    ``scalable``: the feed's output reaches these Linears through channel-wise linear operations
    only and nowhere else, so dividing the feed's output channel c by s_c (a norm's weight, a
    Linear's rows) and multiplying the Linears' input column c by s_c leaves the block unchanged.
    False across a nonlinearity (fc1 -> gelu -> fc2) or from a post-norm that is also the residual.
    """

    names: tuple[str, ...]
    feeds: str | None = None
    scalable: bool = True


def _g(names: str, feeds: str | None, scalable: bool = True) -> Group:
    return Group(tuple(names.split()), feeds, scalable)


LAYOUTS: dict[str, tuple[Group, ...]] = {
    # Llama, Mistral, Qwen2/3, Gemma (1): pre-norm attention then a gated MLP.
    "llama": (
        _g("self_attn.q_proj self_attn.k_proj self_attn.v_proj", "input_layernorm"),
        _g("self_attn.o_proj", "self_attn.v_proj"),
        _g("mlp.gate_proj mlp.up_proj", "post_attention_layernorm"),
        _g("mlp.down_proj", "mlp.up_proj"),
    ),
    # Gemma 2/3: the MLP is fed by its own pre-feedforward norm.
    "gemma2": (
        _g("self_attn.q_proj self_attn.k_proj self_attn.v_proj", "input_layernorm"),
        _g("self_attn.o_proj", "self_attn.v_proj"),
        _g("mlp.gate_proj mlp.up_proj", "pre_feedforward_layernorm"),
        _g("mlp.down_proj", "mlp.up_proj"),
    ),
    # Phi-1/2: attention and MLP in parallel on the same normed input.
    "phi": (
        _g("self_attn.q_proj self_attn.k_proj self_attn.v_proj mlp.fc1", "input_layernorm"),
        _g("self_attn.dense", "self_attn.v_proj"),
        _g("mlp.fc2", "mlp.fc1", scalable=False),  # through gelu
    ),
    # Phi-3: fused qkv and gate_up projections.
    "phi3": (
        _g("self_attn.qkv_proj", "input_layernorm"),
        _g("self_attn.o_proj", "self_attn.qkv_proj"),
        _g("mlp.gate_up_proj", "post_attention_layernorm"),
        _g("mlp.down_proj", "mlp.gate_up_proj"),
    ),
    # BERT / RoBERTa encoder layer (post-norm).
    "bert": (
        _g("attention.self.query attention.self.key attention.self.value", None),
        _g("attention.output.dense", "attention.self.value"),
        _g("intermediate.dense", "attention.output.LayerNorm", scalable=False),  # the norm is also the residual
        _g("output.dense", "intermediate.dense", scalable=False),  # through gelu
    ),
}

MODEL_TYPES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "gemma2", "gemma3": "gemma2", "gemma3_text": "gemma2",
    "phi": "phi", "phi3": "phi3", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert",
}


def layout_for(model: nn.Module, linear_names: list[str]) -> str | None:
    """The layout name for ``model`` (by ``config.model_type``, else the first layout whose names
    cover ``linear_names``), or None for the generic fallback."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    text_cfg = getattr(config, "text_config", None)
    for t in (mtype, getattr(text_cfg, "model_type", None)):
        if t in MODEL_TYPES:
            return MODEL_TYPES[t]
    present = set(linear_names)
    for name, groups in LAYOUTS.items():
        named = {n for g in groups for n in g.names}
        if present and present <= named:
            return name
    return None


def block_groups(model: nn.Module, linear_names: list[str], true_sequential: bool = True) -> list[Group]:
    """Groups of the block's Linears (``linear_names`` relative to the block, in module order), in
    the order to quantize them. ``true_sequential=False``: one group with all of them."""
    if not linear_names:
        return []
    if not true_sequential:
        return [Group(tuple(linear_names))]
    layout = layout_for(model, linear_names)
    present = set(linear_names)
    groups: list[Group] = []
    if layout is not None:
        for g in LAYOUTS[layout]:
            names = tuple(n for n in g.names if n in present)
            if names:
                groups.append(Group(names, g.feeds, g.scalable))
    covered = {n for g in groups for n in g.names}
    groups += [Group((n,)) for n in linear_names if n not in covered]
    return groups
