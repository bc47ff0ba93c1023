"""TorchAO's post-training recipes, reproduced bit for bit on the same weight (torchao 0.18, the
``version=2`` configs): ``torchao-int4``, ``torchao-int8``, ``torchao-int8-dynamic``,
``torchao-float8``. Saved in torchao's safetensors layout (:mod:`polyquant.formats.torchao`).

- ``torchao-int4`` = ``Int4WeightOnlyConfig(group_size)`` with its default ``plain`` packing
  (``Int4Tensor.from_hp`` -> mslk/fbgemm ``int4_row_quantize_zp``), computed in float32 per group of
  ``group_size`` inputs: ``scale = max(max - min, 1e-6) / 15``, ``zero = min + 8 * scale`` (a *float*
  zero, the "tinygemm" zero-point domain), ``u = clamp(round((w - min) / scale), 0, 15)``; scale and
  zero are then cast to the weight's dtype and dequantization is ``(u - 8) * scale + zero``. In
  ``QuantizedWeight`` terms: qtype ``uint4``, ``zero = 8 - zero_float / scale`` (a float code-domain
  zero, kept in float64 so that ``(8 - zero) * scale`` gives torchao's stored zero back exactly), so
  ``dequantize()`` is ``(u - zero) * scale`` and the ``cpu-int4`` kernel's ``z' = (8 - zero) * s`` is
  torchao's zero. Like torchao, the group size must divide ``in_features`` (torchao leaves such layers
  in float; here quantizing them is refused by shape - exclude them or pick a group that divides).
  ``version=1`` reproduces torchao <= 0.15's version-1 config with ``Int4CPULayout`` instead
  (``_choose_qparams_affine_tinygemm`` + ``_quantize_affine_tinygemm``): the same formulas evaluated
  in the weight's dtype, ``scale = max((max - min) / 15, 1e-6)``, and the codes taken against
  ``zero - 8 * scale`` of the *rounded* scale and zero - bit-exact with torchao 0.15 on bf16 weights.
- ``torchao-int8`` = ``Int8WeightOnlyConfig`` (``Int8Tensor``): symmetric, per row (or per tensor);
  ``scale = max(|min(w,0)|, max(w,0)) / 127.5`` in the weight's dtype, clamped to >= float32 eps,
  float32; ``q = clamp(round(w * (1 / scale)), -128, 127)`` (half to even).
- ``torchao-int8-dynamic`` = ``Int8DynamicActivationInt8WeightConfig``: the same weights, plus
  per-token dynamic symmetric int8 activations run as an int8 x int8 product
  (:mod:`polyquant.kernels.int8_dynamic`).
- ``torchao-float8`` = ``Float8WeightOnlyConfig`` (per row) or, with ``activations="float8"``,
  ``Float8DynamicActivationFloat8WeightConfig`` (per tensor by default, as torchao; per row with
  ``granularity="row"``): ``scale = amax(|w|) / 448`` (weight dtype, then float32),
  ``q = (w.float() / scale).clamp(-448, 448).to(float8_e4m3fn)``. An all-zero row gets code 0 (torchao
  would produce NaN codes from 0/0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polyquant.methods.base import MethodConfig, check_choice
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["TorchAOInt4Config", "TorchAOInt8Config", "TorchAOInt8DynamicConfig", "TorchAOFloat8Config",
           "torchao_int4_weight", "torchao_int8_weight", "torchao_float8_weight", "INT4_GROUPS"]

INT4_GROUPS = (32, 64, 128, 256)
GRANULARITIES = ("row", "tensor")


def _check_weight(w: torch.Tensor, who: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{who} quantizes 2-D weights, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{who} needs a float32/float16/bfloat16 weight, got {w.dtype}")


def _check_finite(*stats: torch.Tensor) -> None:
    """NaN / Inf anywhere in the weight shows in its per-block min / max (cheaper than scanning it)."""
    # (max, min): their difference is finite only if both are (one check; an overflowing
    # difference of finite values falls through to the per-tensor check)
    if len(stats) == 2 and bool(torch.isfinite(stats[0] - stats[1]).all()):
        return
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise ValueError("weight contains NaN or Inf values")


# -- the recipes (pure functions) --------------------------------------------------------------
def torchao_int4_weight(weight: torch.Tensor, group_size: int, version: int = 2) -> QuantizedWeight:
    """torchao ``Int4WeightOnlyConfig(group_size)`` as a ``QuantizedWeight``: ``version=2`` the plain
    ``Int4Tensor`` (default), ``version=1`` the version-1 rule with ``Int4CPULayout``."""
    w = weight.detach()
    _check_weight(w, "torchao-int4")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"torchao-int4: group_size {group_size} does not divide in_features {k} of a "
                         f"[{n}, {k}] weight (torchao leaves such layers unquantized); exclude the layer or "
                         f"use a group size from {INT4_GROUPS} that divides {k}")
    if version == 1:
        return _int4_v1(w, group_size)
    x = w.to(torch.float32).reshape(n, k // group_size, group_size)
    if x.data_ptr() == w.data_ptr():
        x = x.clone()  # modified in place below
    mn = x.amin(dim=-1, keepdim=True)  # (torch.aminmax is ~5x slower than amin + amax on CPU)
    mx = x.amax(dim=-1, keepdim=True)
    _check_finite(mx, mn)
    scale = (mx - mn).clamp(min=1e-6) / 15
    zero = mn + scale * 8
    u = x.sub_(mn).div_(scale).round_().clamp_(0, 15).to(torch.uint8).reshape(n, k)
    s = scale.squeeze(-1).to(w.dtype)
    z = zero.squeeze(-1).to(w.dtype)
    zero_code = 8.0 - z.double() / s.double()
    return QuantizedWeight.from_codes(u, "uint4", (1, group_size), s, zero_code)


def _int4_v1(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """torchao <= 0.15 ``Int4WeightOnlyConfig(version=1, layout=Int4CPULayout())``:
    ``_choose_qparams_affine_tinygemm`` + ``_quantize_affine_tinygemm``, every step in the weight's
    dtype (scale and zero are stored in it too)."""
    n, k = w.shape
    x = w.reshape(n, k // group_size, group_size)
    # min / max are exact in float32 and ~5x faster there than in bf16 / fp16 on CPU
    xr = x if x.dtype == torch.float32 else x.to(torch.float32)
    mn = xr.amin(dim=-1, keepdim=True).to(x.dtype)
    mx = xr.amax(dim=-1, keepdim=True).to(x.dtype)
    _check_finite(mx, mn)
    scale = torch.clamp((mx - mn) / 15.0, min=1e-6)
    zero = mn + scale * 8.0
    min_val = zero - scale * 8.0  # the codes follow the stored (rounded) scale and zero
    # clamp(round((x - min_val) / scale), 0, 15) in x's dtype, one buffer
    y = torch.sub(x, min_val).div_(scale).round_().clamp_(0, 15)
    u = _small_uint8(y).reshape(n, k)
    s, z = scale.squeeze(-1), zero.squeeze(-1)
    return QuantizedWeight.from_codes(u, "uint4", (1, group_size), s, 8.0 - z.double() / s.double())


def _small_uint8(y: torch.Tensor) -> torch.Tensor:
    """``y.to(torch.uint8)`` for integer values in [0, 127] held in a float tensor (``y`` is used as
    scratch). bf16 -> uint8 is a slow scalar cast on CPU; ``y + 128`` is exact in bf16 and its bits
    are ``0x4300 + y``, whose low byte is ``y``."""
    if y.dtype == torch.bfloat16:
        return y.add_(128.0).view(torch.int16).to(torch.uint8)
    return y.to(torch.uint8)


def _int8_scale(w: torch.Tensor, granularity: str) -> torch.Tensor:
    from polyquant.activations.int8 import int8_symmetric_scale
    return int8_symmetric_scale(w, (-1,) if granularity == "row" else None)


def torchao_int8_weight(weight: torch.Tensor, granularity: str = "row") -> QuantizedWeight:
    """torchao ``Int8Tensor.from_hp(weight, PerRow() | PerTensor())`` as a ``QuantizedWeight``."""
    w = weight.detach()
    _check_weight(w, "torchao-int8")
    scale = _int8_scale(w, granularity)  # [N, 1] or [1, 1] float32
    _check_finite(scale)
    q = (w * (1.0 / scale)).round_().clamp_(-128, 127)
    codes = torch.bitwise_xor(q.to(torch.int8).view(torch.uint8), 0x80)  # c + 128: the sign bit flipped
    block = (1, w.shape[1]) if granularity == "row" else tuple(w.shape)
    return QuantizedWeight.from_codes(codes, "int8", block, scale)


def torchao_float8_weight(weight: torch.Tensor, granularity: str = "row") -> QuantizedWeight:
    """torchao ``Float8Tensor.from_hp(weight, float8_e4m3fn, PerRow() | PerTensor())``."""
    from polyquant.activations.float8 import float8_codes, float8_scale
    w = weight.detach()
    _check_weight(w, "torchao-float8")
    scale = float8_scale(w, (-1,) if granularity == "row" else None)
    _check_finite(scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = float8_codes(w.to(torch.float32), safe, w.dtype)  # (w / s).clamp(-448, 448) -> e4m3fn
    block = (1, w.shape[1]) if granularity == "row" else tuple(w.shape)
    return QuantizedWeight.from_codes(q, "float8_e4m3fn", block, scale)


# -- configs -----------------------------------------------------------------------------------
@dataclass
class TorchAOInt4Config(MethodConfig):
    """torchao int4 weight-only (``Int4WeightOnlyConfig``).

    Attributes:
        group_size: inputs per scale/zero: 32, 64, 128 (torchao's default) or 256; must divide the
            in_features of every quantized layer.
        version: which torchao quantizer to reproduce: 2 (``Int4Tensor``, torchao's default since
            0.15: min / max / codes in float32) or 1 (the version-1 ``Int4CPULayout`` rule of torchao
            <= 0.15, computed in the weight's dtype, codes from the rounded scale and zero: on a bf16
            model -2.2% ppl on the default model, 18.49 vs 18.91). Stored and run the same way.
    """

    group_size: int = 128
    version: int = 2

    def validate(self) -> None:
        check_choice("group_size", self.group_size, INT4_GROUPS)
        check_choice("version", self.version, (1, 2))

    def describe(self) -> str:
        return f"torchao int4 g{self.group_size}" + (" v1" if self.version == 1 else "")


@dataclass
class _Int8Granularity(MethodConfig):
    """The int8 configs' one option: ``granularity`` (``row`` or ``tensor``)."""

    granularity: str = "row"

    def validate(self) -> None:
        check_choice("granularity", self.granularity, GRANULARITIES)


@dataclass
class TorchAOInt8Config(_Int8Granularity):
    """torchao int8 weight-only (``Int8WeightOnlyConfig``).

    Attributes:
        granularity: ``row`` (one scale per output channel, torchao's default) or ``tensor``.
    """

    def describe(self) -> str:
        return f"torchao int8 w8a16 per-{self.granularity}"


@dataclass
class TorchAOInt8DynamicConfig(_Int8Granularity):
    """torchao int8 dynamic activations + int8 weights (``Int8DynamicActivationInt8WeightConfig``).

    Attributes:
        granularity: ``row`` (per output channel for weights, per token for activations: torchao's
            default) or ``tensor`` (for both).
    """

    def describe(self) -> str:
        return f"torchao w8a8 dynamic per-{self.granularity}"


@dataclass
class TorchAOFloat8Config(MethodConfig):
    """torchao float8 (e4m3fn) weights, optionally with dynamic float8 activations.

    Attributes:
        activations: ``none`` (``Float8WeightOnlyConfig``) or ``float8``
            (``Float8DynamicActivationFloat8WeightConfig``).
        granularity: ``row`` or ``tensor`` for weights and activations; default: torchao's defaults,
            ``row`` weight-only and ``tensor`` with float8 activations.
        activation_value_lb / activation_value_ub: optional clamp of the activation amax before its
            scale is taken (torchao's options of the same names).
    """

    activations: str = "none"
    granularity: str | None = None
    activation_value_lb: float | None = None
    activation_value_ub: float | None = None

    def validate(self) -> None:
        check_choice("activations", self.activations, ("none", "float8"))
        if self.granularity is None:
            self.granularity = "row" if self.activations == "none" else "tensor"
        check_choice("granularity", self.granularity, GRANULARITIES)
        for f in ("activation_value_lb", "activation_value_ub"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{f} must be None or a non-negative number, got {v!r}")
            if v is not None and self.activations == "none":
                raise ValueError(f"{f} applies to float8 activations only (activations='none')")
        lb, ub = self.activation_value_lb, self.activation_value_ub
        if lb is not None and ub is not None and lb > ub:
            raise ValueError(f"activation_value_lb {lb} is above activation_value_ub {ub}")

    def describe(self) -> str:
        a = "a8 dynamic" if self.activations == "float8" else "a16"
        return f"torchao float8 w8{a} per-{self.granularity}"


def _int4(weight, config: TorchAOInt4Config, stats=None) -> QuantizedWeight:
    return torchao_int4_weight(weight, config.group_size, config.version)


def _int8(weight, config, stats=None) -> QuantizedWeight:
    return torchao_int8_weight(weight, config.granularity)


def _float8(weight, config: TorchAOFloat8Config, stats=None) -> QuantizedWeight:
    return torchao_float8_weight(weight, config.granularity)


def _int8_dynamic_rule(config: TorchAOInt8DynamicConfig):
    from polyquant.activations.int8 import Int8DynamicActivation
    return Int8DynamicActivation(config.granularity)


def _float8_rule(config: TorchAOFloat8Config):
    if config.activations != "float8":
        return None
    from polyquant.activations.float8 import Float8DynamicActivation
    return Float8DynamicActivation(config.granularity, config.activation_value_lb, config.activation_value_ub)


_REF = "TorchAO (pytorch/ao 0.18, quantize_ v2 configs)"
register_method(MethodSpec(
    name="torchao-int4", config_cls=TorchAOInt4Config, quantize_weight=_int4, needs_calibration=False,
    family="integer weight-only", bits=(4,), formats=("torchao",),
    description="torchao int4 weight-only: asymmetric min/max groups, float zero (w = (u-8)*s + z)",
    reference=_REF, order=81, presets=(Preset("torchao-int4-g64", {"group_size": 64}),),
    priors=(Prior(4, None, None, rel(18.492), BENCH + ": torchao int4 g64, lm_head float 18.492"),)))
register_method(MethodSpec(
    name="torchao-int8", config_cls=TorchAOInt8Config, quantize_weight=_int8, needs_calibration=False,
    family="integer weight-only", bits=(8,), formats=("torchao",),
    description="torchao int8 weight-only: symmetric absmax/127.5 per row",
    reference=_REF, order=80, presets=(Preset("torchao-int8"),),
    priors=(Prior(8, None, None, rel(14.037), BENCH + ": torchao int8 weight-only 14.037"),)))
register_method(MethodSpec(
    name="torchao-int8-dynamic", config_cls=TorchAOInt8DynamicConfig, quantize_weight=_int8,
    needs_calibration=False, family="integer weight-only", bits=(8,), formats=("torchao",),
    activations="int8 dynamic per token (symmetric)",
    description="torchao W8A8: int8 per-row weights, dynamic per-token int8 activations, int8 x int8 matmul",
    reference=_REF, act_rule=_int8_dynamic_rule, order=82, presets=(Preset("torchao-int8-dynamic"),),
    priors=(Prior(8, None, None, rel(14.417), BENCH + ": torchao int8 dynamic 14.417"),)))
register_method(MethodSpec(
    name="torchao-float8", config_cls=TorchAOFloat8Config, quantize_weight=_float8, needs_calibration=False,
    family="float8", bits=(8,), formats=("torchao",),
    activations="none, or float8 dynamic (per tensor / per token)",
    description="torchao float8 e4m3fn weights (absmax/448 per row or tensor), optional dynamic float8 activations",
    reference=_REF, act_rule=_float8_rule, order=83, presets=(Preset("torchao-float8"),),
    priors=(Prior(8, None, None, rel(14.308), BENCH + ": torchao float8 weight-only 14.308"),)))
