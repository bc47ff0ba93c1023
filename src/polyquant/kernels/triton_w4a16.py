"""``triton-w4a16``: fused unpack + dequantize + matmul for int32-packed 2/4/8-bit weights with
group scales and zeros (the GPTQ layout), fp16/bf16 activations, on CUDA.

Layout prepared once per layer (``prepare``):

- ``qweight`` int32 ``[ceil(K*bits/32), N]``: the codes of ``W.T`` packed along K (exactly
  GPTQ's ``qweight``; column n of a word row holds 32/bits consecutive k), so a tile load is
  coalesced along N;
- ``scales`` ``[G, N]`` and, when the layer has zero points, ``zeros`` fp32 ``[G, N]`` (the total
  offset ``code_offset + zero``; symmetric layers pass the offset as a compile-time constant);
- act-order: the columns are sorted by ``g_idx`` (ExLlama style), so groups are contiguous and
  each K tile reads one scale row; the kernel gathers the input through ``perm`` instead. A
  ``g_idx`` whose groups are not runs of ``group_size`` is read by a per-row gather of scales.

The kernel computes ``y[m, n] = sum_k x[m, k] * ((q[k, n] - z[g(k), n]) * s[g(k), n])`` with an
fp32 accumulator: one row (batch-1 decode) runs the matrix-vector kernel of
:mod:`polyquant.kernels.triton_gemv` (CUDA cores, K split across programs); other decode shapes (M <= 16) use 16-row tiles and split K across programs to fill
the GPU (partial sums reduced in fp32). Prefill shapes (M >= ``DEQUANT_MIN_M``, fp16/bf16) take
ExLlama's route instead: one Triton pass dequantizes the layer to a dense ``[K, N]`` tile, and
cuBLAS multiplies (act-order: the input's columns are gathered by ``perm``).

``triton`` is imported lazily (polyquant imports without it) and the kernel is JIT-wrapped on
first use, so ``TRITON_INTERPRET=1`` (or CPU tensors, which always use Triton's interpreter) runs
it on CPU for tests. Registered for device ``cuda`` only: on CPU ``auto`` never picks it.
"""
from __future__ import annotations

import math

import torch

from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.triton_gemv import int_gemv, int_gemv_reason
from polyquant.kernels.triton_util import import_triton, jit_kernel, triton_available, triton_reason
from polyquant.qtypes import get_qtype
from polyquant.tensor.packing import pack
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["TritonW4A16Kernel", "triton_available", "prepare_w4a16", "w4a16_matmul"]

_BITS = (2, 4, 8)
triton = None  # filled by _import_triton(); the JIT kernel reads ``tl`` from this module's globals
tl = None
_JIT: dict[tuple[bool, str], object] = {}
#: From this many rows of activations on, the layer is dequantized to a dense ``[K, N]`` tile of
#: the activation dtype by one Triton pass and multiplied by cuBLAS (ExLlama's reconstruct-then-GEMM
#: for prefill): at M >= 64 the weight is read once either way and cuBLAS's GEMM is the faster one
#: (measured on an H100: the fused kernel ran at 17-25% of a bf16 matmul at M = 512-2048).
DEQUANT_MIN_M = 64


def _import_triton() -> None:
    import_triton(globals())


def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, gidx_ptr, y_ptr,
                  M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ys, stride_ym,
                  group_size, k_per_split,
                  BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr,
                  HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                  UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full, not tl.zeros: a builtin, so the
    # interpreter runs it even when triton was imported without TRITON_INTERPRET
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            src_k = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            src_k = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + src_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        q = tl.load(q_ptr + (offs_k // PER)[:, None] * stride_qk + offs_n[None, :], mask=mask_kn, other=0)
        q = (q >> ((offs_k % PER) * BITS)[:, None]) & MASK
        if GROUP_ALIGNED:  # the whole K tile lies in one group: one scale (and zero) row
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + g * stride_zg + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // group_size
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask_kn, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask_kn, other=0.0)
        if HAS_ZERO:
            w = (q.to(tl.float32) - z) * s
        else:
            w = (q.to(tl.float32) - OFFSET) * s
        if UPCAST:  # the interpreter's bf16 dot multiplies raw bit patterns (triton 3.9)
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _dequant_kernel(q_ptr, s_ptr, z_ptr, gidx_ptr, w_ptr, N, K, stride_qk, stride_sg, stride_zg, stride_wk,
                    group_size,
                    BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``w [K, N] = (q - z) * s`` in ``w``'s dtype: the prefill path's one pass over the codes."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    q = tl.load(q_ptr + (offs_k // PER)[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    q = (q >> ((offs_k % PER) * BITS)[:, None]) & MASK
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        g = offs_k // group_size
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0.0)
        w = (q.to(tl.float32) - z) * s
    else:
        w = (q.to(tl.float32) - OFFSET) * s
    tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _jit(interpret: bool, fn=None):
    """A kernel (default: the fused matmul), JIT-compiled (GPU) or interpreted (CPU tensors /
    TRITON_INTERPRET=1)."""
    return jit_kernel(fn or _w4a16_kernel, interpret, _JIT)


def dequantize_w4a16(buf: dict[str, torch.Tensor], bits: int, group_size: int, offset: int, N: int, K: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """``W.T [K, N]`` in ``dtype`` from the prepared buffers, rows in the buffers' K order (the
    sorted order when ``buf`` has ``perm``)."""
    qweight, scales = buf["qweight"], buf["scales"]
    zeros, gidx = buf.get("zeros"), buf.get("g_idx")
    n_groups = scales.shape[0]
    gs = group_size if n_groups > 1 else max(K, 1)
    w = torch.empty((K, N), device=qweight.device, dtype=dtype)
    interpret = qweight.device.type != "cuda"
    bk, bn = 32, 128
    grid = (math.ceil(K / bk), math.ceil(N / bn))
    extra = {} if interpret else {"num_warps": 4}
    _jit(interpret, _dequant_kernel)[grid](
        qweight, scales, zeros if zeros is not None else scales, gidx if gidx is not None else qweight, w,
        N, K, qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, w.stride(0), gs,
        BITS=bits, OFFSET=offset, HAS_ZERO=zeros is not None, HAS_GIDX=gidx is not None,
        BLOCK_K=bk, BLOCK_N=bn, **extra)
    return w


def prepare_w4a16(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The kernel's buffers for ``qw`` (see the module docstring), on ``qw``'s device."""
    from polyquant.kernels.cpu_actorder import group_perm
    out, inp = qw.shape
    codes = qw.codes
    buf: dict[str, torch.Tensor] = {}
    if qw.g_idx is not None:
        perm = group_perm(qw)
        if isinstance(perm, str):  # irregular groups: keep the order, gather scales per row
            buf["g_idx"] = qw.g_idx.to(torch.int32).contiguous()
        else:
            codes = codes[:, perm]
            buf["perm"] = perm.to(torch.int32).contiguous()
    buf["qweight"] = pack(codes.t().contiguous(), qw.bits, dim=0).contiguous()
    buf["scales"] = qw.scale.detach().t().contiguous()
    if qw.zero is not None:
        buf["zeros"] = (qw.zero.detach().float() + qw.qt.code_offset).t().contiguous()
    return buf


def _config(M: int, N: int, K: int, group_size: int, n_groups: int, device: torch.device,
            block_m: int | None, block_n: int | None, block_k: int | None, split_k: int | None):
    """Launch parameters. Decode (M <= 16) values come from ``benchmarks/tune_triton_w4a16.py`` on
    an H100 (135 configurations per shape, timed inside CUDA graphs): 32-column tiles, K tiles of
    128 (64 when the group is 64), split-K only when K >= 1024 and the N tiles alone fill less than
    half the GPU (SmolLM2's down_proj: 16-way), else none (split-K's extra reduction costs more than
    it gains at these sizes)."""
    if M <= 16:
        bm, bn, warps, stages = 16, 32, 4, 4
    elif M <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 64, 128, 4, 3
    bm, bn = block_m or bm, block_n or bn
    if block_k is None:
        block_k = next((b for b in (128, 64, 32, 16) if group_size % b == 0), 32)
    aligned = n_groups == 1 or group_size % block_k == 0
    n_tiles_k = math.ceil(K / block_k)
    if split_k is None:
        split_k = 1
        if M <= 16 and device.type == "cuda" and K >= 1024:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            programs = math.ceil(M / bm) * math.ceil(N / bn)
            if 2 * programs < sms:
                split_k = max(1, min(16, n_tiles_k, math.ceil(2 * sms / programs)))
    split_k = max(1, min(int(split_k), n_tiles_k))
    k_per_split = math.ceil(n_tiles_k / split_k) * block_k
    split_k = math.ceil(K / k_per_split)
    return bm, bn, block_k, aligned, split_k, k_per_split, warps, stages


def w4a16_matmul(x: torch.Tensor, buf: dict[str, torch.Tensor], bits: int, group_size: int, offset: int,
                 N: int, K: int, *, block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, dequant_min_m: int | None = None,
                 gemv: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for the prepared buffers ``buf`` (see :func:`prepare_w4a16`); returns
    ``[M, N]`` in ``x.dtype``. From ``dequant_min_m`` rows (default :data:`DEQUANT_MIN_M`) the
    weight is dequantized once and multiplied by ``torch.matmul``; below, the fused kernel runs.
    One row (``M == 1``, batch-1 decode) runs :func:`polyquant.kernels.triton_gemv.int_gemv` where it
    takes the layout (``gemv=False``: the fused matmul kernel anyway).
    CPU tensors run in Triton's interpreter (slow; tests only)."""
    if bits not in _BITS:
        raise ValueError(f"triton-w4a16 handles {_BITS}-bit codes, not {bits}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [M, {K}], got {tuple(x.shape)}")
    x = x.contiguous()
    M = x.shape[0]
    if M >= (DEQUANT_MIN_M if dequant_min_m is None else dequant_min_m) and x.dtype in (torch.float16,
                                                                                           torch.bfloat16):
        wt = dequantize_w4a16(buf, bits, group_size, offset, N, K, x.dtype)
        perm = buf.get("perm")
        xs = x if perm is None else x.index_select(1, perm)
        return torch.matmul(xs, wt)
    if M == 1 and gemv is not False and int_gemv_reason(buf, bits, group_size, K) is None:
        return int_gemv(x, buf, bits, group_size, offset, N, K)
    interpret = x.device.type != "cuda"
    scales = buf["scales"]
    n_groups = scales.shape[0]
    gs = group_size if n_groups > 1 else max(K, 1)
    gidx = buf.get("g_idx")
    bm, bn, bk, aligned, split_k, k_per_split, warps, stages = _config(
        M, N, K, gs, n_groups, x.device, block_m, block_n, block_k, split_k)
    aligned = aligned and gidx is None
    if split_k == 1:
        y = torch.empty((1, M, N), device=x.device, dtype=x.dtype)
    else:
        y = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    zeros, perm = buf.get("zeros"), buf.get("perm")
    qweight = buf["qweight"]
    grid = (math.ceil(M / bm), math.ceil(N / bn), split_k)
    kernel = _jit(interpret)
    extra = {} if interpret else {"num_warps": num_warps or warps, "num_stages": num_stages or stages}
    kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight,
        gidx if gidx is not None else qweight, y,
        M, N, K, x.stride(0), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, y.stride(0), y.stride(1),
        gs, k_per_split,
        BITS=bits, OFFSET=offset, HAS_ZERO=zeros is not None, HAS_PERM=perm is not None,
        HAS_GIDX=gidx is not None, GROUP_ALIGNED=aligned, UPCAST=interpret and x.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return y[0] if split_k == 1 else y.sum(0).to(x.dtype)


class TritonW4A16Kernel(Kernel):
    name = "triton-w4a16"
    devices = ("cuda",)
    priority = 30
    layouts = ("2/4/8-bit integer weights, group-wise or per-channel, sym or asym, act-order g_idx; "
               "fp16/bf16 activations (Triton, CUDA)")
    min_capability = (7, 0)

    def check(self, qw, device):
        if r := triton_reason():
            return r
        if qw.qt.kind != "int" or qw.bits not in _BITS:
            return f"needs {'/'.join(map(str, _BITS))}-bit integer weights, got {qw.qtype}"
        if qw.block[0] != 1:
            return f"needs row blocks of 1, got block {qw.block}"
        if qw.extras:
            return "extras are not supported"
        return self._capability_reason(device)

    def prepare(self, qw):
        return prepare_w4a16(qw)

    def forward(self, module, x):
        shape = x.shape
        m = module._meta
        qt = get_qtype(m["qtype"])
        out, inp = m["shape"]
        gs = inp if m["block"][1] >= inp else m["block"][1]
        buf = {k: module.kbuf(k, None) for k in ("qweight", "scales", "zeros", "perm", "g_idx")}
        buf = {k: v for k, v in buf.items() if v is not None}
        x2 = x.reshape(-1, shape[-1])
        if module.act_quant is not None:
            x2 = module.act_quant(x2)
        y = w4a16_matmul(x2, buf, qt.bits, gs, qt.code_offset, out, inp)
        if module.bias is not None:
            y = y + module.bias.to(y.dtype)
        return y.reshape(*shape[:-1], out)


register_kernel(TritonW4A16Kernel)
