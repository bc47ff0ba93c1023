"""Affine (scale + zero) primitives shared by the integer methods: group views, choice of scale
and zero from min/max, rounding to codes. Pure tensor functions, no modules, no files.

Conventions (the same as GPTQ's quantizer and compressed-tensors' ``calculate_qparams``):
- asymmetric (unsigned qtype ``uintB``): the range always contains 0;
  ``scale = (max - min) / (2**B - 1)``, ``zero = round(-min / scale)``; code = clamp(round(w/s) + z).
- symmetric (signed qtype ``intB``): ``scale = absmax / (2**(B-1) - 0.5)`` (absmax/7.5 for 4 bits,
  absmax/127.5 for 8), no zero; code = clamp(round(w/s), -2**(B-1), 2**(B-1)-1) + 2**(B-1).
- a scale of 0 (an all-zero group) becomes the float32 eps.
"""
from __future__ import annotations

import math

import torch

from polyquant.qtypes import QType
from polyquant.tensor.quantized_weight import expand_blocks

__all__ = ["block_view", "choose_qparams", "quantize_codes", "block_reduce"]


def block_view(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[out, in]`` -> ``[ceil(out/r), ceil(in/c), r*c]``; a partial edge block is padded by
    repeating its own last row/column, so min/max/absmax of every block are unchanged."""
    r, c = block
    out, inp = w.shape
    pr, pc = math.ceil(out / r) * r - out, math.ceil(inp / c) * c - inp
    if pr or pc:
        w = torch.nn.functional.pad(w.unsqueeze(0), (0, pc, 0, pr), mode="replicate").squeeze(0)
    R, C = w.shape[0] // r, w.shape[1] // c
    return w.reshape(R, r, C, c).permute(0, 2, 1, 3).reshape(R, C, r * c)


def block_reduce(w: torch.Tensor, block: tuple[int, int], fn: str) -> torch.Tensor:
    v = block_view(w, block)
    if fn == "amax":
        return v.abs().amax(-1)
    if fn == "min":
        return v.amin(-1)
    if fn == "max":
        return v.amax(-1)
    raise ValueError(fn)


def choose_qparams(w: torch.Tensor, qt: QType, block: tuple[int, int], shrink: float | torch.Tensor = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero for unsigned qtypes) per block from min/max, ranges multiplied by ``shrink``."""
    w = w.float()
    eps = torch.finfo(torch.float32).eps
    if qt.signed:
        amax = block_reduce(w, block, "amax") * shrink
        scale = amax / ((qt.qmax - qt.qmin) / 2)
        return torch.where(scale > 0, scale, torch.full_like(scale, eps)), None
    v = block_view(w, block)
    xmin = torch.clamp(v.amin(-1), max=0) * shrink
    xmax = torch.clamp(v.amax(-1), min=0) * shrink
    scale = (xmax - xmin) / qt.qmax
    scale = torch.where(scale > 0, scale, torch.full_like(scale, eps))
    zero = torch.clamp(torch.round(-xmin / scale), 0, qt.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, qt: QType, block: tuple[int, int], scale: torch.Tensor,
                   zero: torch.Tensor | None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Round ``w`` to codes with the given per-block scale/zero (uint8 ``[out, in]``)."""
    shape = tuple(w.shape)
    s = expand_blocks(scale, block, shape, g_idx).float()
    x = w.float() / s
    if zero is not None:
        x = x + expand_blocks(zero, block, shape, g_idx).float()
    return qt.encode(x)
