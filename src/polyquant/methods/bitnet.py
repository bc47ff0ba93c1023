"""BitNet b1.58 post-training ternarization (absmean) with BitLinear's int8 per-token activations.
Registered as ``bitnet``.

Weights (transformers' ``WeightQuant`` / the BitNet b1.58 paper), in float32:
``m = max(mean|W|, 1e-5)`` over the tensor (BitNet), or per output row (``granularity="channel"``) or
per group of ``group_size`` inputs (``"group"``: options, not BitNet's layout);
``W_q = clamp(round(W * (1 / m)), -1, 1)`` (round half to even), stored as ternary codes ``W_q + 1`` with
the dequantization scale ``m`` (``w ~ W_q * m``). Activations at run time: BitLinear's rule
(:class:`polyquant.activations.bitnet.BitNetActivation`: per-token absmax to int8, ``1e-5`` floor),
computed natively by the ``cpu-ternary`` kernel.

An ordinary model does not survive this (BitNet models are trained ternary): on the default model the
perplexity collapses (see ``benchmarks/bench_bitnet.py``). ``polyquant finetune-ternary`` trains the
ternary model against the float one (:mod:`polyquant.finetune.ternary`) to get a usable one.

``linear_class`` picks the class written into the BitNet checkpoint (``bitlinear`` stores ``weight_scale
= 1 / m``, ``autobitlinear`` offline stores ``m``; default ``autobitlinear``, what Microsoft's BitNet
b1.58 2B4T uses); per-channel / per-group results have no BitNet checkpoint layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polyquant.activations.bitnet import BitNetActivation
from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import Preset
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["BitNetConfig", "bitnet_quantize", "absmean_ternary", "GRANULARITIES", "LINEAR_CLASSES", "WEIGHT_FLOOR"]

GRANULARITIES = ("tensor", "channel", "group")
LINEAR_CLASSES = ("autobitlinear", "bitlinear")
WEIGHT_FLOOR = 1e-5  # WeightQuant's clamp(min=1e-5) on mean|W|


@dataclass
class BitNetConfig(MethodConfig):
    """BitNet b1.58 absmean ternarization.

    Attributes:
        granularity: ``tensor`` (BitNet: one scale per weight), ``channel`` (one per output row) or
            ``group`` (one per ``group_size`` inputs of a row).
        group_size: inputs per scale for ``granularity="group"`` (must divide in_features).
        linear_class: the BitNet checkpoint class to write: ``autobitlinear`` (offline; stores mean|W|)
            or ``bitlinear`` (stores 1/mean|W|).
    """

    granularity: str = "tensor"
    group_size: int = 128
    linear_class: str = "autobitlinear"

    def validate(self) -> None:
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("group_size", self.group_size, 1)
        check_choice("linear_class", self.linear_class, LINEAR_CLASSES)

    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": "per-channel", "group": f"g{self.group_size}"}[self.granularity]
        return f"bitnet ternary {g} a8"


def absmean_ternary(weight: torch.Tensor, granularity: str = "tensor",
                    group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(codes uint8 [out, in] = W_q + 1, scale m, block)`` of BitNet's absmean rule (float32)."""
    w = weight.detach().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"bitnet quantizes 2-D weights, got shape {tuple(w.shape)}")
    out, inp = w.shape
    if granularity == "tensor":
        m = w.abs().mean().clamp(min=WEIGHT_FLOOR).reshape(1, 1)
        block, full = (out, inp), m
    elif granularity == "channel":
        m = w.abs().mean(dim=1, keepdim=True).clamp(min=WEIGHT_FLOOR)
        block, full = (1, inp), m
    elif granularity == "group":
        if inp % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {inp}")
        m = w.view(out, inp // group_size, group_size).abs().mean(dim=-1).clamp(min=WEIGHT_FLOOR)
        block, full = (1, group_size), m.repeat_interleave(group_size, dim=1)
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError("weight contains NaN or Inf values")
    codes = (w * (1.0 / full)).round().clamp(-1, 1).add(1).to(torch.uint8)
    return codes, m, block


def bitnet_quantize(weight: torch.Tensor, config: BitNetConfig, stats: dict | None = None) -> QuantizedWeight:
    codes, m, block = absmean_ternary(weight, config.granularity, config.group_size)
    return QuantizedWeight.from_codes(codes, "ternary", block, m)


def _bind_rule(config: BitNetConfig, qw: QuantizedWeight, act) -> tuple[QuantizedWeight, BitNetActivation]:
    """Every layer gets its own BitLinear activation rule (no input RMSNorm: the model's norms stay)."""
    return qw, BitNetActivation()


register_method(MethodSpec(
    name="bitnet", config_cls=BitNetConfig, quantize_weight=bitnet_quantize, needs_calibration=False,
    family="ternary", bits=(2,), formats=("bitnet",), activations="int8 per token (absmax, BitLinear)",
    description="BitNet b1.58 absmean ternary weights (per tensor; per channel / group options), int8 activations",
    reference="BitNet b1.58 (arXiv 2402.17764); transformers BitLinear / AutoBitLinear",
    layer_act_rule=_bind_rule, order=95, presets=(Preset("bitnet-ternary"),)))
