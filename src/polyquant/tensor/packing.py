"""Bit packing of unsigned integer codes into int32 words.

One definition serves every format: a *dense little-endian bit stream*. Element ``e`` of a row
occupies bits ``[e*bits, (e+1)*bits)`` of the row's stream, and stream bit ``i`` is bit ``i % 32``
of word ``i // 32``. For 1, 2, 4 and 8 bits this is the usual "value j of a word sits at slot j"
order (GPTQ, compressed-tensors); for 3, 5, 6 and 7 bits values straddle words exactly as
GPTQ's 3-bit layout and compressed-tensors' dense odd-width packing define it.

``pack(codes, bits, dim)`` packs along ``dim`` (the last one by default); the packed length is
``ceil(n * bits / 32)``; ``unpack`` needs the original length ``n``.
"""
from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_length"]


def packed_length(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned codes (values in ``[0, 2**bits)``) into int32 words along ``dim``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point:
        raise ValueError("pack() takes integer codes, got a float tensor")
    x = codes.movedim(dim, -1).to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    n = x.shape[-1]
    n_words = packed_length(n, bits)
    if 32 % bits == 0:
        per = 32 // bits
        pad = n_words * per - n
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.reshape(*x.shape[:-1], n_words, per)
        shifts = torch.arange(per, device=x.device, dtype=torch.int64) * bits
        words = (x << shifts).sum(-1)
    else:
        bit_idx = torch.arange(bits, device=x.device, dtype=torch.int64)
        stream = ((x.unsqueeze(-1) >> bit_idx) & 1).reshape(*x.shape[:-1], n * bits)
        pad = n_words * 32 - n * bits
        if pad:
            stream = torch.nn.functional.pad(stream, (0, pad))
        stream = stream.reshape(*x.shape[:-1], n_words, 32)
        words = (stream << torch.arange(32, device=x.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> uint8 codes of length ``n`` along ``dim``."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"unpack() takes int32 words, got {words.dtype}")
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    n_words = w.shape[-1]
    if n_words != packed_length(n, bits):
        raise ValueError(f"{n_words} words cannot hold exactly {n} values of {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
        vals = ((w.unsqueeze(-1) >> shifts) & mask).reshape(*w.shape[:-1], n_words * per)
    else:
        stream = (w.unsqueeze(-1) >> torch.arange(32, device=w.device, dtype=torch.int64)) & 1
        stream = stream.reshape(*w.shape[:-1], n_words * 32)[..., : n * bits]
        stream = stream.reshape(*w.shape[:-1], n, bits)
        vals = (stream << torch.arange(bits, device=w.device, dtype=torch.int64)).sum(-1)
    return vals[..., :n].to(torch.uint8).movedim(-1, dim)
