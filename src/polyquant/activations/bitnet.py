"""BitNet b1.58's activation rule: transformers' ``BitLinear`` (``integrations/bitnet.py``), in the
input's dtype. An optional RMSNorm on the input (``use_rms_norm``; ``LlamaRMSNorm``: float32 variance,
``x * rsqrt(var + eps)``, cast back, times the norm weight), then per token (last dim)
``xs = 127 / max(max|x|, 1e-5)`` - evaluated as PyTorch does ``127 / t``: ``reciprocal(t) * 127`` -
and ``q = clamp(round(x * xs), -128, 127)`` (round half to even). The layer divides its integer
products by ``xs * weight_scale``; as fake quantization (the reference path) ``x ~ q / xs``.
The kernel that computes it natively is ``cpu-ternary``."""
from __future__ import annotations

import torch

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["BitNetActivation", "ACT_FLOOR"]

ACT_FLOOR = 1e-5  # BitLinear's clamp(min=1e-5) on the per-token absmax


@register_act_rule
class BitNetActivation(ActivationQuantizer):
    """transformers' BitLinear activation rule: optional input RMSNorm, then per-token absmax int8.

    Args:
        norm_weight: the RMSNorm weight ``[in]`` (``use_rms_norm``), or None.
        eps: the RMSNorm epsilon (``rms_norm_eps``).
    """

    kind = "bitnet"

    def __init__(self, norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        if norm_weight is not None and norm_weight.dim() != 1:
            raise ValueError(f"norm_weight must be 1-D [in_features], got shape {list(norm_weight.shape)}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps = float(eps)
        if norm_weight is not None:
            self.register_buffer("norm_weight", norm_weight.detach().clone())
        else:
            self.norm_weight = None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The input RMSNorm (identity without ``norm_weight``), as ``LlamaRMSNorm`` computes it."""
        if self.norm_weight is None:
            return x
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm_weight * h.to(dt)

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., K]`` (already normed) -> int8 codes and the per-token multiplier ``xs [..., 1]``
        (``x``'s dtype): ``xs = 127 / max(max|x|, 1e-5)``, ``q = clamp(round(x * xs), -128, 127)``."""
        xs = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_FLOOR)
        q = (x * xs).round().clamp(-128, 127)
        return q.to(torch.int8), xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization (the reference path): ``q / xs`` in ``x``'s dtype."""
        x = self.norm(x)
        q, xs = self.quantize(x)
        return q.to(x.dtype) / xs

    def extra_repr(self) -> str:
        return "bitnet int8 per token" + (f", rms_norm eps={self.eps}" if self.norm_weight is not None else "")

    @property
    def rule(self) -> ActRule:
        opts = (("rms_norm_eps", repr(self.eps)),) if self.norm_weight is not None else ()
        return ActRule(self.kind, "int8", "token", clamp=(ACT_FLOOR, None), recipe="transformers-bitlinear",
                       options=(("rms_norm", str(self.norm_weight is not None).lower()),) + opts)

    @classmethod
    def from_rule(cls, rule: ActRule, **tensors: torch.Tensor) -> "BitNetActivation":
        norm = tensors.get("norm_weight")
        if (rule.option("rms_norm") == "true") != (norm is not None):
            raise ValueError("a bitnet rule with an input RMSNorm needs its norm_weight (and only then)")
        return cls(norm, float(rule.option("rms_norm_eps", "1e-06")))
