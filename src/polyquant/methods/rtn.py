"""RTN: round-to-nearest, the baseline every other method must beat.

Bits 2-8, symmetric (signed codes, scale = absmax / (2**(b-1) - 0.5)) or asymmetric (unsigned
codes with an integer zero point), per-channel or grouped along the input dimension (a group size
that does not divide the input features gives a shorter last group), and an optional clipping
search: a grid of shrink factors applied to each group's range, keeping per group the one with
the smallest ``sum |w - q(w)|^norm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polyquant.methods.base import MethodConfig, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.qtypes import int_qtype
from polyquant.tensor.affine import choose_qparams, quantize_codes
from polyquant.tensor.quantized_weight import QuantizedWeight, expand_blocks

__all__ = ["RTNConfig", "rtn_quantize", "group_block"]


def group_block(shape: tuple[int, int], group_size: int) -> tuple[int, int]:
    """Block for a group size along the input dim (-1 = per channel)."""
    return (1, shape[1]) if group_size == -1 or group_size >= shape[1] else (1, group_size)


def validate_group_size(group_size: int) -> None:
    check_int("group_size", group_size)
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest.

    Attributes:
        bits: 2..8.
        group_size: input columns per scale; -1 for per channel.
        sym: symmetric (no zero point) or asymmetric.
        clip_search: search shrink factors of each group's range (minimizes weight error).
        clip_grid: number of shrink factors tried, evenly spaced in [clip_min, 1].
        clip_min: smallest shrink factor.
        clip_norm: exponent of the error that the search minimizes (GPTQ's MSE search uses 2.4).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip_search: bool = False
    clip_grid: int = 20
    clip_min: float = 0.5
    clip_norm: float = 2.4

    def validate(self) -> None:
        check_int("bits", self.bits, 2, 8)
        validate_group_size(self.group_size)
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be a bool, got {self.sym!r}")
        check_int("clip_grid", self.clip_grid, 1, 1000)
        if not 0 < float(self.clip_min) <= 1:
            raise ValueError(f"clip_min must be in (0, 1], got {self.clip_min}")
        if not float(self.clip_norm) > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")

    def describe(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"rtn w{self.bits} {g} {'sym' if self.sym else 'asym'}{' clip' if self.clip_search else ''}"


def rtn_quantize(weight: torch.Tensor, config: RTNConfig, stats: dict | None = None) -> QuantizedWeight:
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"RTN quantizes 2-D weights, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    qt = int_qtype(config.bits, signed=config.sym)
    block = group_block(tuple(w.shape), config.group_size)
    scale, zero = choose_qparams(w, qt, block)
    if config.clip_search:
        scale, zero = _clip_search(w, qt, block, config, scale, zero)
    codes = quantize_codes(w, qt, block, scale, zero)
    return QuantizedWeight.from_codes(codes, qt.name, block, scale, zero)


def _block_error(deq: torch.Tensor, w: torch.Tensor, block: tuple[int, int], norm: float) -> torch.Tensor:
    """Per block ``sum |deq - w|^norm`` over the block's real elements (a short edge block is
    zero-padded, so no element counts twice)."""
    e = (deq - w).abs().pow(norm)
    r, c = block
    e = torch.nn.functional.pad(e, (0, -e.shape[1] % c, 0, -e.shape[0] % r))
    return e.reshape(e.shape[0] // r, r, e.shape[1] // c, c).sum((1, 3))


def _clip_search(w, qt, block, config: RTNConfig, scale, zero):
    best_err = None
    for p in torch.linspace(1.0, float(config.clip_min), int(config.clip_grid)).tolist():
        s, z = choose_qparams(w, qt, block, shrink=p)
        # (decode(code) - zero) * scale, as QuantizedWeight.dequantize computes it, without packing
        deq = qt.decode(quantize_codes(w, qt, block, s, z))
        if z is not None:
            deq = deq - expand_blocks(z, block, tuple(w.shape))
        deq = deq * expand_blocks(s, block, tuple(w.shape))
        err = _block_error(deq, w, block, float(config.clip_norm))
        if best_err is None:
            best_err, scale, zero = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


register_method(MethodSpec(
    name="rtn",
    config_cls=RTNConfig,
    quantize_weight=rtn_quantize,
    needs_calibration=False,
    family="integer weight-only",
    bits=(2, 3, 4, 5, 6, 8),
    formats=("compressed-tensors",),
    description="round-to-nearest integer weights, per channel or group, optional clipping search",
    reference="baseline (GPTQ paper, Frantar et al. 2022, 'RTN')",
    order=10,
    presets=(Preset("rtn-w8-pc", {"bits": 8, "group_size": -1, "sym": True}),
             Preset("rtn-w4-g64-sym", {"bits": 4, "group_size": 64, "sym": True}),
             Preset("rtn-w4-g64-asym", {"bits": 4, "group_size": 64, "sym": False}),
             Preset("rtn-w3-g64", {"bits": 3, "group_size": 64, "sym": True})),
    priors=(Prior(8, "pc", None, rel(14.041), "assumed: as int8 per-row absmax (" + BENCH + ": pq-torchao-int8 14.041)"),
            Prior(4, "pc", True, rel(27.518), BENCH + ": RTN W4 per-channel 27.518"),
            Prior(4, "g64", True, rel(20.249), BENCH + ": RTN W4 g64 sym 20.249"),
            Prior(4, "g64", False, rel(18.129), BENCH + ": RTN W4 g64 asym 18.129"),
            Prior(3, "g64", None, rel(97.748), BENCH + ": RTN W3 g64 sym 97.748")),
))
