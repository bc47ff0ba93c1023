"""FP8 (e4m3) weight quantization: four registered methods, one weight quantizer.

============  ==========================================  ======================================  ==================
method        weights (float8_e4m3fn, fp32 scales)        activations at run time                 format
============  ==========================================  ======================================  ==================
fbgemm-fp8    per output channel                          dynamic per token, amax <= ub (1200)    fbgemm_fp8
fp8-block     128 x 128 blocks (partial edge blocks)      dynamic per token per 128 channels      fp8 (fine-grained)
fp8           compressed-tensors float schemes: per        dynamic per token (per 128 channels    compressed-tensors
              tensor / channel / block                    for block weights), or none
fp8-static    per tensor (or channel)                     static per tensor, from calibration     compressed-tensors
============  ==========================================  ======================================  ==================

Scales come from each block's (row's, tensor's) absolute maximum ``amax``, with the producer's
own arithmetic so that our codes are the ones its tool writes:

* ``fbgemm-fp8`` (FBGEMM ``quantize_fp8_per_row``): ``inv = 448 / max(amax, 1e-12)``,
  ``q = sat(w * inv)``, ``scale = 1 / inv``;
* ``fp8-block`` (transformers ``Fp8Quantize``): ``inv = 448 / amax`` (1 for an all-zero block; as
  torch evaluates transformers' ``float / tensor``: ``448 * reciprocal(amax)``), ``q = sat(w * inv)``,
  ``scale = 1 / inv``;
* ``fp8`` / ``fp8-static`` (compressed-tensors ``calculate_qparams``): ``scale = amax / 448`` (fp32
  eps for an all-zero block), ``q = sat(w / scale)``.

``sat`` is :func:`polyquant.kernels.fp8.fp8_saturate` (clamp to +-448, round to nearest even).
Dequantization is ``q * scale``. Error bound: a weight whose ``|w| / scale`` is a normal e4m3 value
(>= 2**-6) is reconstructed within ``2**-4 * |w|`` (3 mantissa bits, half an ulp); smaller ones
within ``2**-10 * scale`` (half the subnormal spacing).

Presets (compressed-tensors names): :func:`fp8_preset` ``("FP8_DYNAMIC" | "FP8_BLOCK" |
"FP8_WEIGHT_ONLY" | "FP8")`` returns the matching config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from polyquant.activations.fp8 import Fp8ActQuant, fp8_saturate
from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight, expand_blocks

__all__ = ["FbgemmFp8Config", "Fp8BlockConfig", "Fp8Config", "Fp8StaticConfig", "FP8_PRESETS", "fp8_preset",
           "fp8_quantize", "block_amax", "check_block_size", "AbsMaxCollector"]

FP8_QTYPE = "float8_e4m3fn"
_EPS32 = torch.finfo(torch.float32).eps


# -- validation --------------------------------------------------------------------------------
def check_block_size(name: str, value: Any) -> tuple[int, int]:
    """A ``[rows, cols]`` block: two positive integers."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be [rows, cols] (two positive integers), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _check_ub(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"activation_scale_ub must be a positive finite number, got {value!r}")


# -- configs -----------------------------------------------------------------------------------
@dataclass
class FbgemmFp8Config(MethodConfig):
    """FBGEMM FP8: per-channel e4m3 weights; activations quantized per token at run time.

    Attributes:
        activation_scale_ub: upper bound on a token's absolute maximum before its scale is taken
            (transformers' ``FbgemmFp8Config.activation_scale_ub``); larger values saturate.
    """

    activation_scale_ub: float = 1200.0

    def validate(self) -> None:
        _check_ub(self.activation_scale_ub)

    def describe(self) -> str:
        return f"fbgemm-fp8 (act ub {float(self.activation_scale_ub):g})"


@dataclass
class Fp8BlockConfig(MethodConfig):
    """Fine-grained FP8 (DeepSeek-V3): e4m3 weights in ``weight_block_size`` blocks; activations
    quantized per token and group of ``weight_block_size[1]`` input channels at run time.

    Attributes:
        weight_block_size: ``[rows, cols]`` of a weight block (edge blocks may be partial).
        activation_scheme: ``dynamic`` (the only scheme this method writes).
    """

    weight_block_size: list[int] = field(default_factory=lambda: [128, 128])
    activation_scheme: str = "dynamic"

    group_field: ClassVar[str | None] = "weight_block_size"  # --group-size N: N x N blocks

    def validate(self) -> None:
        check_block_size("weight_block_size", self.weight_block_size)
        check_choice("activation_scheme", self.activation_scheme, ("dynamic",))

    def describe(self) -> str:
        r, c = self.weight_block_size
        return f"fp8-block {r}x{c}"


@dataclass
class Fp8Config(MethodConfig):
    """compressed-tensors float8 schemes without calibration (``FP8_DYNAMIC``, ``FP8_BLOCK``,
    weight-only).

    Attributes:
        weights: ``tensor``, ``channel`` or ``block`` scales.
        block_size: ``[rows, cols]`` for ``block`` weights.
        activations: ``dynamic`` (per token; per token and ``block_size[1]`` channels for block
            weights) or ``none`` (weight-only).
    """

    weights: str = "channel"
    block_size: list[int] = field(default_factory=lambda: [128, 128])
    activations: str = "dynamic"

    def validate(self) -> None:
        check_choice("weights", self.weights, ("tensor", "channel", "block"))
        check_block_size("block_size", self.block_size)
        check_choice("activations", self.activations, ("dynamic", "none"))

    def describe(self) -> str:
        w = f"block {self.block_size[0]}x{self.block_size[1]}" if self.weights == "block" else self.weights
        return f"fp8 w:{w} a:{self.activations}"


@dataclass
class Fp8StaticConfig(MethodConfig):
    """compressed-tensors ``FP8``: e4m3 weights, activations with a static per-tensor scale per
    layer, ``max |x| / 448`` over the calibration data (llm-compressor's ``static_minmax``).

    Attributes:
        weights: ``tensor`` (the preset) or ``channel`` scales.
    """

    weights: str = "tensor"

    def validate(self) -> None:
        check_choice("weights", self.weights, ("tensor", "channel"))

    def describe(self) -> str:
        return f"fp8-static w:{self.weights}"


#: compressed-tensors preset name -> (method, config fields)
FP8_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "FP8_DYNAMIC": ("fp8", {"weights": "channel", "activations": "dynamic"}),
    "FP8_BLOCK": ("fp8", {"weights": "block", "block_size": [128, 128], "activations": "dynamic"}),
    "FP8_WEIGHT_ONLY": ("fp8", {"weights": "channel", "activations": "none"}),
    "FP8": ("fp8-static", {"weights": "tensor"}),
}


def fp8_preset(name: str, **overrides: Any) -> MethodConfig:
    """The config of a compressed-tensors float preset (``FP8_DYNAMIC``, ``FP8_BLOCK``,
    ``FP8_WEIGHT_ONLY``, ``FP8``), with ``overrides`` (e.g. ``exclude=[...]``)."""
    key = str(name).upper()
    if key not in FP8_PRESETS:
        raise ValueError(f"unknown fp8 preset {name!r}; known: {sorted(FP8_PRESETS)}")
    method, fields = FP8_PRESETS[key]
    cls = Fp8Config if method == "fp8" else Fp8StaticConfig
    return cls(**{**fields, **overrides})


# -- the quantizer -----------------------------------------------------------------------------
def block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``max |w|`` per block: ``[ceil(out/r), ceil(in/c)]`` (edge blocks partial; zero padding)."""
    r, c = block
    a = w.abs()
    a = F.pad(a, (0, -a.shape[1] % c, 0, -a.shape[0] % r))
    return a.reshape(a.shape[0] // r, r, a.shape[1] // c, c).amax(dim=(1, 3))


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int], recipe: str = "ct") -> QuantizedWeight:
    """e4m3 codes and fp32 block scales for ``weight [out, in]`` (``recipe``: ``fbgemm``,
    ``transformers`` or ``ct``; see the module docstring)."""
    if weight.dim() != 2:
        raise ValueError(f"fp8 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    r, c = check_block_size("block", list(block))
    shape = (int(w.shape[0]), int(w.shape[1]))
    amax = block_amax(w, (r, c))
    if recipe == "ct":
        scale = amax / torch.full_like(amax, 448.0)
        scale = torch.where(scale == 0, torch.full_like(scale, _EPS32), scale)
        q = fp8_saturate(w / expand_blocks(scale, (r, c), shape))
    elif recipe in ("fbgemm", "transformers"):
        if recipe == "fbgemm":
            inv = torch.full_like(amax, 448.0) / amax.clamp(min=1e-12)  # IEEE division (tensor / tensor)
        else:  # transformers' Fp8Quantize literally: `python float / tensor` is reciprocal(t) * 448 in torch
            safe = torch.where(amax > 0, amax, torch.ones_like(amax))
            inv = torch.where(amax > 0, 448.0 / safe, torch.ones_like(amax))
        q = fp8_saturate(w * expand_blocks(inv, (r, c), shape))
        scale = torch.reciprocal(inv)
    else:
        raise ValueError(f"recipe must be 'fbgemm', 'transformers' or 'ct', got {recipe!r}")
    return QuantizedWeight.from_codes(q, FP8_QTYPE, (r, c), scale.contiguous())


def _fbgemm_quantize(weight, config: FbgemmFp8Config, stats=None) -> QuantizedWeight:
    return fp8_quantize(weight, (1, weight.shape[1]), "fbgemm")


def _block_quantize(weight, config: Fp8BlockConfig, stats=None) -> QuantizedWeight:
    return fp8_quantize(weight, tuple(config.weight_block_size), "transformers")


def _ct_block(weight: torch.Tensor, weights: str, block_size) -> tuple[int, int]:
    out, inp = weight.shape
    return {"tensor": (out, inp), "channel": (1, inp)}.get(weights) or tuple(block_size)


def _ct_quantize(weight, config: Fp8Config, stats=None) -> QuantizedWeight:
    return fp8_quantize(weight, _ct_block(weight, config.weights, config.block_size), "ct")


def _static_quantize(weight, config: Fp8StaticConfig, stats=None) -> QuantizedWeight:
    """Weights as ``fp8``; the layer's static input scale rides along as ``extras['input_scale']``
    until :func:`_bind_static` moves it into the activation rule."""
    if not stats or "absmax" not in stats:
        raise ValueError("fp8-static needs calibration statistics (the inputs' absolute maximum)")
    qw = fp8_quantize(weight, _ct_block(weight, config.weights, None), "ct")
    s = torch.as_tensor(stats["absmax"], dtype=torch.float32).reshape(1, 1) / 448.0
    s = torch.where(s == 0, torch.full_like(s, _EPS32), s)
    qw.extras["input_scale"] = s
    return qw


# -- activation rules --------------------------------------------------------------------------
def _fbgemm_act(config: FbgemmFp8Config) -> Fp8ActQuant:
    return Fp8ActQuant("fbgemm", None, float(config.activation_scale_ub))


def _block_act(config: Fp8BlockConfig) -> Fp8ActQuant:
    return Fp8ActQuant("deepseek", int(config.weight_block_size[1]))


def _ct_act(config: Fp8Config) -> Fp8ActQuant | None:
    if config.activations == "none":
        return None
    return Fp8ActQuant("ct", int(config.block_size[1]) if config.weights == "block" else None)


def _bind_static(config: Fp8StaticConfig, qw: QuantizedWeight, act) -> tuple[QuantizedWeight, Fp8ActQuant]:
    extras = dict(qw.extras)
    s = extras.pop("input_scale")
    bare = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, qw.g_idx, extras)
    return bare, Fp8ActQuant("ct", scale=s)


class AbsMaxCollector:
    """Running ``max |x|`` over every calibration input of a Linear (shareable: it depends on the
    inputs only)."""

    shareable = True

    def __init__(self) -> None:
        self.absmax = torch.zeros((), dtype=torch.float32)

    def add(self, x: torch.Tensor) -> None:
        if x.numel():
            self.absmax = torch.maximum(self.absmax, x.detach().abs().amax().float().cpu())

    def result(self) -> dict:
        return {"absmax": self.absmax}


_ACTS = "fp8 e4m3 dynamic"
register_method(MethodSpec(
    name="fbgemm-fp8", config_cls=FbgemmFp8Config, quantize_weight=_fbgemm_quantize, needs_calibration=False,
    family="float8", bits=(8,), formats=("fbgemm_fp8",),
    activations=f"{_ACTS} per token (amax <= activation_scale_ub)",
    description="FBGEMM FP8: per-channel e4m3 weights, per-token dynamic fp8 activations",
    reference="pytorch/FBGEMM quantize_fp8_per_row; transformers FbgemmFp8Config",
    act_rule=_fbgemm_act, order=90, presets=(Preset("fbgemm-fp8"),),
    priors=(Prior(8, None, None, rel(14.441), BENCH + ": fbgemm-fp8 14.441"),)))
register_method(MethodSpec(
    name="fp8-block", config_cls=Fp8BlockConfig, quantize_weight=_block_quantize, needs_calibration=False,
    family="float8", bits=(8,), formats=("fp8",),
    activations=f"{_ACTS} per token and 1 x 128 group",
    description="fine-grained FP8: e4m3 weights in 128x128 blocks, 1x128 dynamic activation groups",
    reference="DeepSeek-V3 (arXiv 2412.19437); transformers FineGrainedFP8Config",
    act_rule=_block_act, order=91, presets=(Preset("fp8-block"),),
    priors=(Prior(8, None, None, rel(14.213), BENCH + ": fp8-block 14.213"),)))
register_method(MethodSpec(
    name="fp8", config_cls=Fp8Config, quantize_weight=_ct_quantize, needs_calibration=False,
    family="float8", bits=(8,), formats=("compressed-tensors",),
    activations=f"{_ACTS} per token (per 128-group for block weights), or none",
    description="compressed-tensors FP8_DYNAMIC / FP8_BLOCK / weight-only e4m3",
    reference="vllm-project/compressed-tensors quant_scheme.py presets",
    act_rule=_ct_act, order=92, presets=(Preset("fp8-dynamic"),),
    priors=(Prior(8, None, None, rel(14.462), BENCH + ": ct-fp8-dynamic 14.462"),)))
register_method(MethodSpec(
    name="fp8-static", config_cls=Fp8StaticConfig, quantize_weight=_static_quantize, needs_calibration=True,
    family="float8", bits=(8,), formats=("compressed-tensors",),
    activations="fp8 e4m3 static per tensor (calibrated max |x| / 448)",
    description="compressed-tensors FP8: e4m3 weights, static per-tensor fp8 activation scales from data",
    reference="vllm-project/compressed-tensors FP8 preset; llm-compressor static_minmax observer",
    collect=lambda lin: AbsMaxCollector(), layer_act_rule=_bind_static, order=93, presets=(Preset("fp8-static"),),
    priors=(Prior(8, None, None, rel(14.424), BENCH + ": ct-fp8-static 14.424"),)))
