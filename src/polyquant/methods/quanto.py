"""optimum-quanto's weight quantization (0.2.7, ``quantize(model, weights=...)`` + ``freeze``) and its
optional static activation quantization. Registered as ``quanto``.

Weights (``QModuleMixin.qweight`` with the default optimizers), computed in the weight's dtype:

- ``qint8`` (``AbsmaxOptimizer``): per output row ``scale = max|w| / 127``;
  ``q = clamp(round(w / scale), -128, 127)``; ``w = q * scale``.
- ``qfloat8`` (e4m3fn): per row ``scale = max|w| / 448``; ``q = clamp(w / scale, -448, 448)`` cast
  to float8.
- ``qint2`` / ``qint4`` (``MaxOptimizer``, group-wise affine): groups of ``group_size`` consecutive
  inputs - quanto takes 128 and lowers it by 32 until it divides ``in_features`` (576 -> 96), down to
  32; if none divides, or ``in_features <= 128``, one group spans the row. Per group
  ``scale = (max - min) / (2**(b-1) - 1 - (-2**(b-1)))`` (15 for int4, 3 for int2),
  ``shift = -min`` (a float), ``u = clamp(round((w + shift) / scale), 0, 2**b - 1)`` and
  ``w = u * scale - shift``. As a ``QuantizedWeight``: qtype ``uint4`` / ``uint2``, ``zero = shift /
  scale`` (float64, so that ``zero * scale`` gives the shift back exactly). A constant group
  (``max == min``) has scale 0 in quanto (its codes come from 0/0); here it is stored with scale 1,
  code 0 and ``zero = shift``, which dequantizes to the same value.

``group_size`` other than 128 starts the same search elsewhere; quanto's reader derives the group from
``in_features`` with 128, so only 128 gives checkpoints quanto reloads (the format refuses others).

Activations (``activations="qint8"|"qfloat8"``): static per-tensor scales calibrated on data with
quanto's momentum rule and its first-batch output quantization (:mod:`polyquant.kernels.quanto_act`:
the scales equal quanto's on the same data), run as quanto does on CPU: qint8 activations on qint8
weights as an int8 x int8 product (``quanto-int8``), otherwise fake quantization of each quantized
layer's input. Pass ``calibration=`` to ``polyquant.quantize`` (any token windows) or call
:func:`polyquant.kernels.quanto_act.calibrate_activations` later; without data the scales are
dynamic per call until calibrated, and the model cannot be saved in quanto's format.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["QuantoConfig", "quanto_quantize", "quanto_group_size", "WEIGHTS", "ACTIVATIONS"]

WEIGHTS = {"qint2": 2, "qint4": 4, "qint8": 8, "qfloat8": 8}
ACTIVATIONS = ("none", "qint8", "qfloat8")
_BY_BITS = {2: "qint2", 4: "qint4", 8: "qint8"}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def quanto_group_size(in_features: int, group_size: int = 128) -> int | None:
    """quanto's group for 2/4-bit weights (``QModuleMixin.__init__``): None means one group per row."""
    g = group_size
    if in_features > g:
        while in_features % g != 0 and g > 32:
            g -= 32
        if in_features % g == 0:
            return g
    return None


@dataclass
class QuantoConfig(MethodConfig):
    """optimum-quanto.

    Attributes:
        weights: ``qint2``, ``qint4``, ``qint8`` or ``qfloat8`` (default: from ``bits``, else qint4).
        bits: 2, 4 or 8 (default: from ``weights``); both given must agree.
        activations: ``none``, ``qint8`` or ``qfloat8`` (static scales, calibrated on data).
        group_size: where quanto's group search starts for 2/4-bit weights (128; see module doc).
        momentum: momentum of the activation-scale calibration (quanto: 0.9).
    """

    weights: str | None = None
    bits: int | None = None
    activations: str = "none"
    group_size: int = 128
    momentum: float = 0.9

    def validate(self) -> None:
        if self.bits is not None:
            check_choice("bits", self.bits, tuple(_BY_BITS))
        if self.weights is not None:
            check_choice("weights", self.weights, tuple(WEIGHTS))
        if self.weights is None:
            self.weights = _BY_BITS[self.bits] if self.bits is not None else "qint4"
        if self.bits is None:
            self.bits = WEIGHTS[self.weights]
        if WEIGHTS[self.weights] != self.bits:
            raise ValueError(f"weights {self.weights!r} is {WEIGHTS[self.weights]}-bit but bits is {self.bits}")
        check_choice("activations", self.activations, ACTIVATIONS)
        check_int("group_size", self.group_size, 1)
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) \
                or not 0.0 <= float(self.momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def describe(self) -> str:
        a = "" if self.activations == "none" else f" a:{self.activations}"
        g = f" g{self.group_size}" if self.bits < 8 else ""
        return f"quanto {self.weights}{g}{a}"


def _check(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"quanto quantizes 2-D weights here, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quanto needs a float32/float16/bfloat16 weight, got {w.dtype}")


def _finite(*stats: torch.Tensor) -> None:
    # NaN / Inf anywhere in the weight shows in its per-group min / max
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise ValueError("weight contains NaN or Inf values")


def quanto_quantize(weight: torch.Tensor, config: QuantoConfig, stats: dict | None = None) -> QuantizedWeight:
    w = weight.detach()
    _check(w)
    out, inp = w.shape
    if config.weights in ("qint8", "qfloat8"):
        qmax = 127.0 if config.weights == "qint8" else FP8_MAX
        # max |w| per row as max(max w, -min w): the same value without materializing |w|
        amax = torch.maximum(torch.amax(w, dim=1, keepdim=True), torch.amin(w, dim=1, keepdim=True).neg_())
        scale = amax.abs_() / qmax   # in w's dtype
        _finite(scale)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        if config.weights == "qint8":
            x = (w / safe).round_().clamp_(-128, 127)
            # the int8 code c stored with offset 128 is c + 128 = the byte of int8 c with its top bit flipped
            codes = torch.bitwise_xor(x.to(torch.int8).view(torch.uint8), 0x80)
            return QuantizedWeight.from_codes(codes, "int8", (1, inp), scale)
        from polyquant.activations.float8 import float8_codes
        q = float8_codes(w, safe)  # (w / s) in w's dtype, clamp(-448, 448), e4m3fn
        return QuantizedWeight.from_codes(q, "float8_e4m3fn", (1, inp), scale)
    bits = config.bits
    g = quanto_group_size(inp, config.group_size) or inp
    x = w.reshape(out, inp // g, g)
    rmin = torch.amin(x, dim=-1, keepdim=True)  # (torch.aminmax is ~5x slower than both on CPU)
    rmax = torch.amax(x, dim=-1, keepdim=True)
    _finite(rmin, rmax)
    scale = (rmax - rmin) / ((1 << (bits - 1)) - 1 + (1 << (bits - 1)))
    shift = -rmin
    flat = scale == 0
    scale = torch.where(flat, torch.ones_like(scale), scale)
    u = torch.add(x, shift).div_(scale).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8).reshape(out, inp)
    s = scale.squeeze(-1)
    zero = shift.squeeze(-1).double() / s.double()
    return QuantizedWeight.from_codes(u, f"uint{bits}", (1, g), s, zero)


def _activation_rule(config: QuantoConfig):
    """The static activation rule of each quantized layer (given at construction, so that the kernel is
    chosen for it: ``quanto-int8`` for qint8 activations on int8 weights)."""
    if config.activations == "none":
        return None
    from polyquant.activations.quanto import QuantoActivation
    return QuantoActivation(config.activations, momentum=config.momentum)


def _after_quantize(model, config: QuantoConfig, calibration, names: list[str]) -> None:
    """Calibrate the static activation rules of the quantized layers."""
    if config.activations == "none":
        return
    from polyquant.calibration.activations import calibrate_activations
    if calibration is None:
        warnings.warn("quanto activations without calibration data use dynamic per-tensor scales until "
                      "calibrate_activations(model, data) runs; pass calibration= to quantize", stacklevel=3)
        return
    calibrate_activations(model, calibration)


register_method(MethodSpec(
    name="quanto", config_cls=QuantoConfig, quantize_weight=quanto_quantize, needs_calibration=False,
    family="integer weight-only", bits=(2, 4, 8), formats=("quanto",),
    activations="none, or static per-tensor int8 / float8 (calibrated)",
    description="optimum-quanto: int2/int4 group-wise affine (float shift), int8 / float8 per-row absmax",
    reference="huggingface/optimum-quanto 0.2.7",
    act_rule=_activation_rule, after_quantize=_after_quantize, order=70,
    presets=(Preset("quanto-int8", {"bits": 8}), Preset("quanto-int4-g64", {"bits": 4, "group_size": 64})),
    priors=(Prior(8, None, None, rel(14.018), BENCH + ": optimum-quanto qint8 14.018"),
            Prior(4, None, None, rel(21.885), BENCH + ": optimum-quanto qint4, lm_head float 21.885"))))
