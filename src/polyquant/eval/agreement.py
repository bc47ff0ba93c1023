"""Agreement with the unquantized model: KL divergence ``KL(P_ref || P_q)`` and top-1 agreement,
computed from logits of the same window, position by position.

Both are computed in float32 from ``log_softmax`` of each model's logits, in chunks of positions
so the extra memory stays small (a few tens of MB) even with a 49k vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AgreementStats", "kl_top1"]

_CHUNK = 128  # positions per chunk (128 x 49152 x 4 B = 25 MB per float32 temporary)


@dataclass
class AgreementStats:
    """Running sums over positions: ``kl`` and ``top1`` are the means."""

    kl_sum: float = 0.0
    agree: int = 0
    positions: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        kl_sum, agree, n = kl_top1(ref_logits, logits)
        self.kl_sum += kl_sum
        self.agree += agree
        self.positions += n

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.positions if self.positions else None

    @property
    def top1(self) -> float | None:
        return self.agree / self.positions if self.positions else None


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int, int]:
    """Sum over positions of ``KL(softmax(ref) || softmax(q))``, the number of positions whose
    argmax agrees, and the number of positions.

    Args:
        ref_logits: reference logits ``[..., vocab]``.
        logits: the quantized model's logits, same shape (moved to ``ref_logits``' device).
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: reference {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    ref = ref_logits.reshape(-1, ref_logits.shape[-1])
    q = logits.reshape(-1, logits.shape[-1]).to(ref.device)
    kl_sum = 0.0
    agree = 0
    for i in range(0, ref.shape[0], _CHUNK):
        lp_ref = F.log_softmax(ref[i:i + _CHUNK].float(), dim=-1)
        lp_q = F.log_softmax(q[i:i + _CHUNK].float(), dim=-1)
        kl_sum += float((lp_ref.exp() * (lp_ref - lp_q)).sum(dim=-1).double().sum())
        agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
    return kl_sum, agree, ref.shape[0]
