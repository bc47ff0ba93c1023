"""EETQ: int8 per-channel symmetric weight-only quantization (NetEase-FuXi/EETQ, whose quantizer is
FasterTransformer's ``symmetric_quantize``; transformers' ``EetqConfig``). Registered as ``eetq``.

Per output channel ``n`` (a column of the transposed weight EETQ quantizes), in float32:
``scale = max_k |W[n, k]| * (1 / 128)`` - the full power-of-two range 2**(bits-1), *not* 127, so the
largest weight maps to 128 and is clipped to 127 - and ``q = clamp(round(W / scale), -128, 127)`` with
C's ``round`` (half away from zero). The codes are computed with the float32 scale; the stored scale is
cast to ``scale_dtype`` (float16: EETQ's GEMM reads half-precision scales) and dequantization is
``q * stored_scale``. An all-zero channel has scale 0; EETQ's 0/0 gives code 127 there (its clamp of
NaN), reproduced so that codes match byte for byte.

EETQ has no calibration and no group size; the layout on disk (preprocessed for the CUTLASS kernel of
a GPU architecture) is :mod:`polyquant.formats.eetq`'s business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polyquant.methods.base import MethodConfig, check_choice
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["EETQConfig", "eetq_quantize", "round_half_away"]

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``round``: to nearest, ties away from zero (``torch.round`` rounds ties to even)."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5).to(x.dtype)


@dataclass
class EETQConfig(MethodConfig):
    """EETQ int8 weight-only.

    Attributes:
        scale_dtype: dtype of the stored per-channel scales: ``float16`` (what EETQ's kernel reads
            and transformers' ``EetqLinear`` declares) or ``float32``.
    """

    scale_dtype: str = "float16"

    def validate(self) -> None:
        check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))

    def describe(self) -> str:
        return "eetq w8a16 per-channel"


def eetq_quantize(weight: torch.Tensor, config: EETQConfig, stats: dict | None = None) -> QuantizedWeight:
    w = weight.detach()
    if w.dim() != 2:
        raise ValueError(f"EETQ quantizes 2-D weights, got shape {tuple(w.shape)}")
    x = w.to(torch.float32)
    scale = x.abs().amax(dim=1, keepdim=True) * (1.0 / 128.0)  # [out, 1], exact (power of two)
    if not bool(torch.isfinite(scale).all()):  # NaN / Inf anywhere in a row shows in its absmax
        raise ValueError("weight contains NaN or Inf values")
    with torch.no_grad():
        r = round_half_away(x / scale)
    q = torch.where(torch.isnan(r), torch.full_like(r, 127.0), r.clamp(-128, 127))
    codes = (q + 128).to(torch.uint8)
    return QuantizedWeight.from_codes(codes, "int8", (1, w.shape[1]), scale.to(SCALE_DTYPES[config.scale_dtype]))


register_method(MethodSpec(
    name="eetq", config_cls=EETQConfig, quantize_weight=eetq_quantize, needs_calibration=False,
    family="integer weight-only", bits=(8,), formats=("eetq",),
    description="EETQ int8 weight-only: per-channel absmax/128, round half away from zero, fp16 scales",
    reference="NetEase-FuXi/EETQ (FasterTransformer symmetric_quantize); transformers EetqConfig",
    order=60, presets=(Preset("eetq-int8"),),
    priors=(Prior(8, None, None, rel(14.083), BENCH + ": pq-eetq 14.083"),)))
