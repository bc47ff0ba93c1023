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

import math
import sys

import torch

__all__ = ["pack", "unpack", "packed_length"]


def packed_length(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _period(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest run after which the bit stream realigns with word edges."""
    e = 32 // math.gcd(32, bits)
    return e, e * bits // 32


def _slot_tensors(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each value slot of a period: the word holding its lowest bit and the bit offset there."""
    e, _ = _period(bits)
    pos = torch.arange(e, dtype=torch.int64, device=device) * bits
    return pos // 32, pos % 32


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned codes (values in ``[0, 2**bits)``) into int32 words along ``dim``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point:
        raise ValueError("pack() takes integer codes, got a float tensor")
    x = codes.movedim(dim, -1)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    n = x.shape[-1]
    n_words = packed_length(n, bits)
    if 32 % bits == 0 and sys.byteorder == "little":
        # stream order is memory order: fill bytes, then read each 4 as one word
        per = 8 // bits
        x = x.to(torch.uint8)
        if n_words * 32 // bits != n:
            x = torch.nn.functional.pad(x, (0, n_words * 32 // bits - n))
        if bits == 4:
            # two codes per byte: the little-endian int16 of a byte pair is lo + 256 * hi (both < 16), so
            # the low byte of v | (v >> 4) is lo | hi << 4 - two passes instead of a strided gather
            v = x.contiguous().reshape(-1).view(torch.int16)  # (1-D: a size-1 dim's stride may be odd)
            b = torch.bitwise_right_shift(v, 4).bitwise_or_(v).to(torch.uint8)
            return b.reshape(*x.shape[:-1], n_words * 4).view(torch.int32).movedim(-1, dim)
        if per > 1:
            x = x.reshape(*x.shape[:-1], n_words * 4, per)
            b = x[..., 0].clone(memory_format=torch.contiguous_format)
            for j in range(1, per):
                b |= x[..., j] << (j * bits)
            x = b
        else:  # a fresh row-major copy: never alias the caller's codes, and strides a 4-byte view accepts
            x = x.clone(memory_format=torch.contiguous_format)
        return x.view(torch.int32).movedim(-1, dim)
    e, wp = _period(bits)
    n_periods = -(-n // e)
    x = x.to(torch.int64)
    if n_periods * e != n:
        x = torch.nn.functional.pad(x, (0, n_periods * e - n))
    x = x.reshape(*x.shape[:-1], n_periods, e)
    # the layout repeats every ``e`` values / ``wp`` words; value j goes to bits s_j.. of word k_j and
    # spills its high bits into word k_j + 1 (bit fields are disjoint, so sums are ORs)
    word, shift = _slot_tensors(bits, x.device)
    t = x << shift
    words = torch.zeros(*x.shape[:-1], wp, dtype=torch.int64, device=x.device)
    words.index_add_(-1, word, t & 0xFFFFFFFF)
    words.index_add_(-1, (word + 1).clamp_(max=wp - 1), t >> 32)
    words = words.reshape(*x.shape[:-2], n_periods * wp)[..., :n_words]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> uint8 codes of length ``n`` along ``dim``."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"unpack() takes int32 words, got {words.dtype}")
    w = words.movedim(dim, -1)
    n_words = w.shape[-1]
    if n_words != packed_length(n, bits):
        raise ValueError(f"{n_words} words cannot hold exactly {n} values of {bits} bits")
    mask = (1 << bits) - 1
    lead = w.shape[:-1]
    if 32 % bits == 0 and sys.byteorder == "little":
        # a word's bytes in memory order hold its values in stream order: split each byte
        b = w.contiguous().view(torch.uint8)
        if bits == 8:
            return b[..., :n].clone().movedim(-1, dim)
        per = 8 // bits
        vals = torch.empty(*b.shape, per, dtype=torch.uint8, device=b.device)
        for j in range(per):
            torch.bitwise_and(b >> (j * bits), mask, out=vals[..., j])
        return vals.reshape(*lead, b.shape[-1] * per)[..., :n].movedim(-1, dim)
    if sys.byteorder == "little":
        # odd widths: the stream realigns with *byte* edges every 8 / gcd(8, bits) values (8 values in 3
        # bytes at 3 bits); gather each such run of bytes into one integer and shift the values out
        b = w.contiguous().view(torch.uint8)
        g = math.gcd(8, bits)
        per, nb = 8 // g, bits // g
        runs = -(-b.shape[-1] // nb)
        if runs * nb != b.shape[-1]:
            b = torch.nn.functional.pad(b, (0, runs * nb - b.shape[-1]))
        b = b.reshape(*lead, runs, nb)
        dt = torch.int32 if nb <= 3 else torch.int64
        t = b[..., 0].to(dt)
        for i in range(1, nb):
            t |= b[..., i].to(dt) << (8 * i)
        shifts = torch.arange(per, dtype=dt, device=b.device) * bits
        vals = ((t.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
        return vals.reshape(*lead, runs * per)[..., :n].movedim(-1, dim)
    e, wp = _period(bits)
    n_periods = -(-n_words // wp)
    w = w.to(torch.int64) & 0xFFFFFFFF
    if n_periods * wp != n_words:
        w = torch.nn.functional.pad(w, (0, n_periods * wp - n_words))
    w = w.reshape(*lead, n_periods, wp)
    # each value lies inside the 64-bit window (word k, word k + 1) of its period
    pairs = w.clone()
    pairs[..., :-1] |= w[..., 1:] << 32
    word, shift = _slot_tensors(bits, w.device)
    vals = ((pairs[..., word] >> shift) & mask).to(torch.uint8)
    return vals.reshape(*lead, n_periods * e)[..., :n].movedim(-1, dim)
