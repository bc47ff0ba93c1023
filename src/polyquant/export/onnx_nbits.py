"""The MatMulNBits side of the ONNX export (:mod:`polyquant.export.onnx`): whether a quantized layer
fits ``com.microsoft.MatMulNBits`` bit for bit, and its packed inputs (``B``, ``scales``,
``zero_points``, ``g_idx`` or a gather order) and attributes. No onnx import: numpy and torch only."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from polyquant.export.base import ExportError

__all__ = ["onnx_check_layer", "matmulnbits_tensors", "onnx_layer_type"]


# -- the layer --------------------------------------------------------------------------------
def _per_tensor(qw) -> bool:
    return tuple(qw.block) == tuple(qw.shape)


def _block_size(qw) -> tuple[int | None, str | None]:
    out, inp = qw.shape
    r, c = qw.block
    if _per_tensor(qw):  # one scale (BitNet): repeated over every row and block
        r = 1
    if r != 1:
        return None, f"2-D blocks {qw.block} (MatMulNBits has one scale per row block of K)"
    if c >= inp:  # per channel: repeat the row's scale over blocks that divide K
        for b in (128, 64, 32, 16):
            if inp % b == 0:
                return b, None
        return None, f"per-channel weight with K={inp} not divisible by 16"
    if c < 16 or c & (c - 1):
        return None, f"group size {c} is not a power of two >= 16 (MatMulNBits' block_size)"
    return c, None


def onnx_check_layer(qw) -> str | None:
    """Why MatMulNBits cannot hold ``qw`` bit for bit (None when it can)."""
    qt = qw.qt
    if qt.kind not in ("int", "ternary"):
        return f"qtype {qw.qtype} is not an integer grid (MatMulNBits holds integer codes)"
    if qt.bits not in (2, 4, 8):
        return f"{qt.bits}-bit codes (onnxruntime's CPU MatMulNBits runs 2, 4 and 8 bits)"
    if qw.extras:
        return f"extra tensors {sorted(qw.extras)} (e.g. sparse outliers) have no MatMulNBits input"
    bs, why = _block_size(qw)
    if why:
        return why
    if qw.zero is not None:
        z = qw.zero.to(torch.float32)
        if not bool((z == z.round()).all()):
            return "non-integer zero points (e.g. HQQ's float zeros): MatMulNBits' uint8 zero points cannot hold them"
        zp = z + qt.code_offset
        if zp.min() < 0 or zp.max() > (1 << qt.bits) - 1:
            return f"zero points outside the {qt.bits}-bit code range"
    if qw.g_idx is not None:
        g = qw.g_idx.long()
        counts = torch.bincount(g, minlength=qw.scale.shape[1])
        c = qw.block[1]
        if bool((counts[:-1] != c).any()) or int(counts[-1]) > c:
            return "act-order groups of unequal sizes cannot be made contiguous blocks"
    return None


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[..., n]`` codes -> ``[..., n * bits / 8]`` bytes, low bits first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def matmulnbits_tensors(qw) -> dict[str, Any]:
    """The MatMulNBits inputs and attributes for ``qw`` (``[N, K]``): ``B``, ``scales``, optional
    ``zero_points``, ``g_idx`` or ``perm`` (a column order to gather the activation with first),
    and ``attrs``. Raises ExportError with the reason when the layer cannot be stored exactly."""
    why = onnx_check_layer(qw)
    if why:
        raise ExportError(why)
    n, k = qw.shape
    bits = qw.bits
    bs, _ = _block_size(qw)
    kb = math.ceil(k / bs)
    codes = qw.codes
    scale = qw.scale.to(torch.float32)
    zero = qw.zero
    off = qw.qt.code_offset
    zp = None if zero is None else (zero.to(torch.float32) + off)
    g_idx = perm = None
    if qw.g_idx is not None:
        g = qw.g_idx.long()
        if zp is None and bits in (2, 4) and off == 1 << (bits - 1):
            g_idx = g.to(torch.int32).numpy()
        else:  # sort the columns by group: each group becomes one contiguous block
            p = torch.argsort(g, stable=True)
            perm, codes = p.numpy().astype(np.int64), codes[:, p]
    c = qw.block[1]
    if _per_tensor(qw):
        scale = scale.reshape(1, 1)
    if c >= k:  # per channel (or tensor): one scale (zero) per row, repeated over the blocks
        scale = scale.expand(n, kb)
        zp = None if zp is None else zp.expand(n, kb)
    if zp is None and off != 1 << (bits - 1):  # unsigned (or ternary) codes without zero: zp = offset
        zp = torch.full((n, kb), float(off))
    if zp is not None and bool((zp == (1 << (bits - 1))).all()):
        zp = None  # the default zero point
    pad = kb * bs - k
    cn = codes.numpy()
    if pad:
        fill = (1 << (bits - 1)) if zp is None else 0
        cn = np.concatenate([cn, np.full((n, pad), fill, np.uint8)], axis=1)
    B = _pack_bits(cn.reshape(n, kb, bs), bits)
    out = {"B": B, "scales": np.ascontiguousarray(scale.numpy().reshape(-1)),
           "attrs": {"K": k, "N": n, "bits": bits, "block_size": bs}}
    if zp is not None:
        zpn = zp.numpy().astype(np.uint8)
        per = 8 // bits
        zpad = (-kb) % per
        if zpad:
            zpn = np.concatenate([zpn, np.zeros((n, zpad), np.uint8)], axis=1)
        out["zero_points"] = _pack_bits(zpn, bits).reshape(-1)
    if g_idx is not None:
        out["g_idx"] = g_idx
    if perm is not None:
        out["perm"] = perm
    return out



def onnx_layer_type(qw) -> str:
    """The MatMulNBits variant a layer it holds becomes (``MatMulNBits4``, ``+g_idx`` / ``+gather`` for act-order)."""
    t = f"MatMulNBits{qw.bits}"
    if qw.g_idx is not None:
        sym = qw.zero is None and qw.bits in (2, 4) and qw.qt.code_offset == 1 << (qw.bits - 1)
        t += "+g_idx" if sym else "+gather"
    return t

