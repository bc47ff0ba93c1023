"""LLM.int8()'s activation rule (bitsandbytes ``int8_vectorwise_quant``): per-token int8 with
outlier columns kept in float. The rule and the int8 x int8 product are described in
:mod:`polyquant.kernels.bnb_int8`; this module holds the rule and its reference fake quantization."""
from __future__ import annotations

import torch

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["LLMInt8Activation"]


@register_act_rule
class LLMInt8Activation(ActivationQuantizer):
    """Per-token int8 activation quantization with LLM.int8's outlier columns.

    Args:
        threshold: outlier magnitude (``llm_int8_threshold``); 0 or inf disables the decomposition.
        quant_dtype: ``float16`` (bitsandbytes) or ``float32``: the dtype X is cast to before its
            absmax and codes are computed.
    """

    kind = "llm-int8"
    graph_safe = False  # the outlier columns come from the data (nonzero): not capturable in a CUDA graph

    def __init__(self, threshold: float = 6.0, quant_dtype: str = "float16") -> None:
        super().__init__()
        if not float(threshold) >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if quant_dtype not in ("float16", "float32"):
            raise ValueError(f"quant_dtype must be 'float16' or 'float32', got {quant_dtype!r}")
        self.threshold = float(threshold)
        self.quant_dtype = quant_dtype

    @property
    def decomposes(self) -> bool:
        return 0.0 < self.threshold < float("inf")

    def quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x2 [M, K]`` -> ``CA`` int8 ``[M, K]``, ``SCA`` fp32 ``[M]``, outlier column indices (or None)."""
        a = x2.to(getattr(torch, self.quant_dtype))
        cols = None
        if self.decomposes:
            outliers = a.abs() >= self.threshold
            if bool(outliers.any()):
                cols = outliers.any(dim=0).nonzero().flatten()
                a = a.masked_fill(outliers, 0)
        sca = a.abs().amax(dim=1).float()
        safe = torch.where(sca > 0, sca, torch.ones_like(sca))
        ca = torch.round(a * (127.0 / safe).unsqueeze(-1)).to(torch.int8)
        if cols is not None:
            ca[:, cols] = 0
        return ca, sca, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization (the reference path): ``CA * SCA / 127`` outside the outlier columns."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ca, sca, cols = self.quantize(x2)
        fq = ca.float() * (sca / 127.0).unsqueeze(-1)
        if cols is not None:
            fq[:, cols] = x2[:, cols].float()
        return fq.to(x.dtype).reshape(shape)

    @property
    def rule(self) -> ActRule:
        return ActRule(self.kind, "int8", "token", outlier_threshold=self.threshold if self.decomposes else None,
                       recipe="bitsandbytes", options=(("quant_dtype", self.quant_dtype), ("threshold", repr(self.threshold))))

    @classmethod
    def from_rule(cls, rule: ActRule, **tensors) -> "LLMInt8Activation":
        return cls(float(rule.option("threshold", "6.0")), rule.option("quant_dtype", "float16"))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, quant_dtype={self.quant_dtype}"
