"""What the Hessian-based methods (GPTQ, SpQR, AQLM) do first with a layer's statistics: check
them against the weight and take fp32 working copies, and zero the inputs calibration never reached.
"""
from __future__ import annotations

import torch

__all__ = ["hessian_inputs", "zero_dead_inputs"]


def hessian_inputs(weight: torch.Tensor, stats: dict | None, method: str,
                   check_samples: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, H)``: fp32 copies of a ``[out, in]`` weight (on the Hessian's device) and of
    ``stats["H"]`` (``[in, in]``; ``stats`` is not modified). ValueError naming ``method`` when the
    statistics are missing, empty (``stats["n"] == 0``, with ``check_samples``), misshapen or not
    finite, or the weight is not 2-D or not finite."""
    if not stats or stats.get("H") is None:
        raise ValueError(f"{method} needs calibration statistics ({{'H': hessian}}); quantize the model with "
                         "calibration data: polyquant.quantize(model, cfg, calibration=...)")
    if check_samples and stats.get("n") is not None and int(stats["n"]) <= 0:
        raise ValueError(f"{method}: no calibration samples reached this layer (n = 0)")
    if weight.dim() != 2:
        raise ValueError(f"{method} quantizes 2-D weights, got shape {tuple(weight.shape)}")
    H0 = stats["H"]
    inp = weight.shape[1]
    if tuple(H0.shape) != (inp, inp):
        raise ValueError(f"Hessian shape {tuple(H0.shape)} does not match {inp} input features")
    if not torch.isfinite(H0).all():
        raise ValueError(f"{method}: the Hessian contains NaN or Inf (non-finite activations in the calibration "
                         "forward; check the model and calibration data)")
    W = weight.detach().to(H0.device, torch.float32).clone()
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf values")
    return W, H0.detach().to(torch.float32).clone()


def zero_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Inputs no calibration sample reached (``H_ii = 0``) get ``H_ii = 1`` and a zero weight
    column, in place (GPTQ's convention). Returns their mask."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return dead
