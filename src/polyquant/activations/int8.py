"""Dynamic symmetric int8 activations as torchao quantizes them (``Int8Tensor.from_hp`` on the
activation, ``PerRow`` = per token, or per tensor): ``scale = max(|min(x, 0)|, max(x, 0)) / 127.5``
in the activation's dtype, clamped below at the float32 eps, cast to float32;
``q = clamp(round(x * (1 / scale)), -128, 127)``. The int8 x int8 kernel is ``int8-dynamic``."""
from __future__ import annotations

import torch

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["Int8DynamicActivation", "int8_symmetric_scale"]

_F32_EPS = torch.finfo(torch.float32).eps


def int8_symmetric_scale(x: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """torchao's symmetric int8 scale (``choose_qparams_affine``, quant range [-128, 127]) over
    ``dims`` (None: the whole tensor), computed in ``x``'s dtype and returned as float32 (keepdim)."""
    if dims is None:
        lo, hi = x.amin(), x.amax()
        lo, hi = lo.reshape([1] * x.dim()), hi.reshape([1] * x.dim())
    else:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    amax = torch.maximum(-lo, hi)
    scale = torch.clamp(amax / 127.5, min=_F32_EPS)
    return scale.to(torch.float32)


@register_act_rule
class Int8DynamicActivation(ActivationQuantizer):
    """Dynamic symmetric int8 activations, one scale per token (``granularity="row"``) or per
    input tensor (``"tensor"``), as torchao quantizes them."""

    kind = "int8-dynamic"

    def __init__(self, granularity: str = "row") -> None:
        super().__init__()
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
        self.granularity = granularity

    def quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x2 [M, K]`` -> int8 codes ``[M, K]`` and float32 scales ``[M, 1]`` (``[1, 1]`` per tensor)."""
        scale = int8_symmetric_scale(x2, (-1,) if self.granularity == "row" else None)
        q = torch.clamp(torch.round(x2 * (1.0 / scale)), -128, 127).to(torch.int8)
        return q, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization (the reference path): ``q * scale`` in the input's dtype."""
        return self._fake_quant_rows(x)

    @property
    def rule(self) -> ActRule:
        return ActRule(self.kind, "int8", "token" if self.granularity == "row" else "tensor", recipe="torchao")

    @classmethod
    def from_rule(cls, rule: ActRule, **tensors) -> "Int8DynamicActivation":
        return cls("row" if rule.granularity == "token" else "tensor")

    def extra_repr(self) -> str:
        return f"int8 dynamic, per {'token' if self.granularity == 'row' else 'tensor'}"
