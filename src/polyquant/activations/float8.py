"""Dynamic float8 activations (torchao ``Float8DynamicActivationFloat8WeightConfig``), emulated.

torchao 0.18 quantizes the activation with ``Float8Tensor.from_hp`` (the ``torch`` kernel choice,
which is what runs off Hopper GPUs): per token (``granularity="row"``) or per tensor,
``scale = amax(|x|) / 448`` computed in the activation's dtype, optionally clamped to
``[activation_value_lb, activation_value_ub]`` before the division, cast to float32;
``q = (x.float() / scale).clamp(-448, 448).to(float8_e4m3fn)`` (round to nearest even). The
product is ``torch._scaled_mm(q_x, q_w^T, scale_x, scale_w)``.

Here the rule is applied as fake quantization (``q.float() * scale``) in front of any kernel, so
the product is the same sum in float (``torch._scaled_mm`` runs on CPU in torch 2.13, but measured
no faster than dequantizing the weight: ~25 ms for a 1x576 @ 576x1536 product on the shared 2-core
development machine; float8 weights run on whichever float8 kernel is registered). Difference from
torchao: an all-zero token gets scale 0 there (0/0 = NaN codes); here it stays 0.
"""
from __future__ import annotations

import torch

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["Float8DynamicActivation", "float8_scale", "FP8_MAX", "float8_codes"]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def float8_scale(x: torch.Tensor, dims: tuple[int, ...] | None, lb: float | None = None,
                 ub: float | None = None) -> torch.Tensor:
    """torchao ``_choose_scale_float8``: ``amax(|x|) / 448`` over ``dims`` (None: all), in ``x``'s
    dtype, as float32 with kept dims."""
    # max |x| = max(max x, -min x): two reductions without materializing |x| (same value; NaN
    # propagates; abs_ keeps a zero amax +0 as abs().amax() gives it)
    if dims is None:
        amax = torch.maximum(x.amax(), x.amin().neg()).abs_().reshape([1] * x.dim())
    else:
        amax = torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_()).abs_()
    if lb is not None or ub is not None:
        amax = torch.clamp(amax, min=lb, max=ub)
    return (amax / FP8_MAX).to(torch.float32)


def float8_codes(x: torch.Tensor, safe_scale: torch.Tensor, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(x / safe_scale).clamp(-448, 448).to(float8_e4m3fn)`` for ``safe_scale >= amax(|x|) / 448``
    (each row's or the tensor's): the quotient may exceed 448 only by the scale's rounding, and
    torch's cast rounds anything below 464 to 448 as the clamp would, so the clamp pass is skipped
    when every scale is a normal number of ``scale_dtype`` (a subnormal scale has too few bits to
    bound the quotient). The division is done in ``x``'s dtype (cast ``x`` first for another)."""
    q = x / safe_scale
    tiny = torch.finfo(scale_dtype or safe_scale.dtype).tiny
    if not (safe_scale.numel() and float(safe_scale.amin()) >= tiny):
        q.clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn)


@register_act_rule
class Float8DynamicActivation(ActivationQuantizer):
    """Dynamic float8 (e4m3fn) activations with a per-token or per-tensor scale."""

    kind = "float8-dynamic"

    def __init__(self, granularity: str = "tensor", lb: float | None = None, ub: float | None = None) -> None:
        super().__init__()
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        self.lb = lb
        self.ub = ub

    def quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x2 [M, K]`` -> float8 codes and float32 scales (``[M, 1]`` or ``[1, 1]``)."""
        scale = float8_scale(x2, (-1,) if self.granularity == "row" else None, self.lb, self.ub)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (x2.to(torch.float32) / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant_rows(x)

    @property
    def rule(self) -> ActRule:
        clamp = None if self.lb is None and self.ub is None else (self.lb, self.ub)
        return ActRule(self.kind, "float8_e4m3fn", "token" if self.granularity == "row" else "tensor",
                       clamp=clamp, recipe="torchao")

    @classmethod
    def from_rule(cls, rule: ActRule, **tensors) -> "Float8DynamicActivation":
        lb, ub = rule.clamp if rule.clamp is not None else (None, None)
        return cls("row" if rule.granularity == "token" else "tensor", lb, ub)

    def extra_repr(self) -> str:
        return f"float8_e4m3fn dynamic, per {'token' if self.granularity == 'row' else 'tensor'}"
