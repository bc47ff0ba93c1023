"""The small per-layer operations of a batch-1 decode step, one Triton launch each (CUDA; CPU tensors
run in Triton's interpreter for the tests). Inside a captured decode graph
(:class:`polyquant.nn.graph_decode.GraphDecoder`) each PyTorch op between the matmuls is a kernel of
a few microseconds, and a Llama block has about twenty of them; these fuse them into three:

* :func:`add_rms_norm` -- ``x += delta`` (the residual add, optional) and ``h = rms_norm(x) * w``;
* :func:`silu_mul` -- ``act(g) * u`` over the fused gate/up output (SiLU);
* :func:`rope_kv_write` -- rope on q and k at the position tensor (tables read there, rotate-half
  convention) and k, v written into their cache slot: the four ops of each, and both
  ``index_copy_`` s, in one launch.

Arithmetic in fp32, results stored in the activation dtype: the same operations as the PyTorch path
(``F.rms_norm``'s ``x * rsqrt(mean(x^2) + eps) * w``; rope's ``x * cos + rotate_half(x) * sin``), so
they agree with it to the rounding of the activation dtype (tests bound the difference).
"""
from __future__ import annotations

import torch

from polyquant.kernels.triton_util import import_triton, jit_kernel, triton_available

__all__ = ["add_rms_norm", "silu_mul", "rope_kv_write", "decode_ops_reason"]

triton = None
tl = None
_JIT: dict[tuple[bool, str], object] = {}


def decode_ops_reason(device: torch.device) -> str | None:
    """Why the fused decode ops cannot run on ``device`` (None when they can)."""
    import os
    if not triton_available():
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"the fused decode ops run on CUDA (or in Triton's interpreter), not {device.type}"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, K, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = x + tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)  # the residual stream is stored in the activation dtype
        tl.store(x_ptr + offs, x, mask=mask)
        x = x.to(tl.float32)
    ms = tl.sum(x * x, axis=0) / K
    r = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (x * r * w).to(h_ptr.dtype.element_ty), mask=mask)


def _silu_mul_kernel(gu_ptr, y_ptr, I, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = g / (1.0 + tl.exp(-g))
    tl.store(y_ptr + offs, (s.to(y_ptr.dtype.element_ty).to(tl.float32) * u).to(y_ptr.dtype.element_ty), mask=mask)


def _rope_kv_kernel(qkv_ptr, q_out_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr,
                    NH, NKV, max_len, HD: tl.constexpr, HALF: tl.constexpr):
    hid = tl.program_id(0)  # 0..NH-1: q heads, NH..NH+NKV-1: k heads (and their v head)
    pos = tl.load(pos_ptr)
    offs = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + pos * HD + offs).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * HD + HALF + offs).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * HD + offs).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * HD + HALF + offs).to(tl.float32)
    base = qkv_ptr + hid * HD
    a = tl.load(base + offs).to(tl.float32)
    b = tl.load(base + HALF + offs).to(tl.float32)
    lo = a * c1 - b * s1
    hi = b * c2 + a * s2
    if hid < NH:
        tl.store(q_out_ptr + hid * HD + offs, lo.to(q_out_ptr.dtype.element_ty))
        tl.store(q_out_ptr + hid * HD + HALF + offs, hi.to(q_out_ptr.dtype.element_ty))
    else:
        kv = hid - NH
        slot = (kv * max_len + pos) * HD
        tl.store(kc_ptr + slot + offs, lo.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + slot + HALF + offs, hi.to(kc_ptr.dtype.element_ty))
        vbase = qkv_ptr + (NH + NKV + kv) * HD
        v1 = tl.load(vbase + offs)
        v2 = tl.load(vbase + HALF + offs)
        tl.store(vc_ptr + slot + offs, v1.to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + slot + HALF + offs, v2.to(vc_ptr.dtype.element_ty))


def _interp(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def add_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, delta: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` in place (when given), then ``rms_norm(x) * w``; ``x`` one contiguous row."""
    h = torch.empty_like(x)
    k = x.numel()
    jit_kernel(_add_rms_norm_kernel, _interp(x), _JIT)[(1,)](
        x, delta if delta is not None else x, w, h, k, float(eps), HAS_DELTA=delta is not None,
        BLOCK=_next_pow2(k))
    return h


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for a fused gate/up row ``gu [1, 2I]`` (g first) -> ``[1, I]``; the SiLU is
    rounded to the activation dtype before the product, as ``F.silu(g) * u`` does."""
    i = gu.shape[-1] // 2
    y = torch.empty((1, i), device=gu.device, dtype=gu.dtype)
    block = 1024
    jit_kernel(_silu_mul_kernel, _interp(gu), _JIT)[(triton_cdiv(i, block),)](gu.contiguous(), y, i, BLOCK=block)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """For a fused q/k/v row ``qkv [1, (nh + 2 nkv) * hd]``: q rotated -> returned ``[nh, hd]``; k
    rotated and v written into ``k_cache`` / ``v_cache [nkv, max_len, hd]`` at slot ``pos`` (a
    one-element device tensor). ``cos`` / ``sin``: the rope tables ``[max_len, hd]``."""
    hd = cos.shape[-1]
    q = torch.empty((n_heads, hd), device=qkv.device, dtype=qkv.dtype)
    jit_kernel(_rope_kv_kernel, _interp(qkv), _JIT)[(n_heads + n_kv,)](
        qkv.contiguous(), q, k_cache, v_cache, cos, sin, pos, n_heads, n_kv, k_cache.shape[1], HD=hd,
        HALF=hd // 2)
    return q
