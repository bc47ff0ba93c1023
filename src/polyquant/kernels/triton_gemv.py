"""Batch-1 decode matrix-vector products in Triton: the ``M == 1`` path of ``triton-w4a16`` and of
the FP8 kernels (``triton-fp8-block``, ``fp8-scaled-mm``).

At decode a layer multiplies one activation row by the whole weight: the work is reading the
weight once, so what matters is keeping enough loads in flight to approach the memory bandwidth.
The matmul kernels pad that row to a 16-row tensor-core tile and give each program a long K loop;
these kernels instead split the layer into ``BLOCK_N``-column tiles and ``split`` K ranges (enough
programs to cover every multiprocessor several times), multiply on the CUDA cores in fp32 and sum
the K ranges' partial results in fp32 (one small reduction, or none when ``split == 1``).

:func:`int_gemv` (codes packed along K in int32 words, GPTQ's ``qweight [ceil(K*bits/32), N]``;
group scales and zeros ``[G, N]``; act-order through ``perm``)::

    y[n] = sum over words w:  s[g(w), n] * (sum_j x[k] * q[k, n]  -  z[g(w), n] * sum_j x[k])

with ``k = w * (32 / bits) + j`` -- the group ``g`` is constant over a word because the group size
is a multiple of the codes per word (checked).

:func:`fp8_gemv` (float8_e4m3fn weights ``[N, K]`` with block scales ``[ceil(N/bn), ceil(K/bk)]``)
fuses the layer's activation rule (:class:`polyquant.activations.fp8.Fp8ActQuant`) into the product:
each program derives the row's (or the K group's) scale from ``max |x|`` exactly as the rule does
(the same recipe, IEEE-rounded divisions, the saturating round-to-nearest-even cast), multiplies the
fp8 activation codes by the fp8 weight codes in fp32 and applies both scales to the fp32 sums -- no
separate quantization kernels, no fp8 activation tensor in memory.

``triton`` is imported lazily; CPU tensors run in Triton's interpreter (tests).
"""
from __future__ import annotations

import math

import torch

from polyquant.kernels.triton_util import import_triton, jit_kernel

__all__ = ["int_gemv", "int_gemv_reason", "fp8_gemv", "fp8_gemv_reason", "gemv_config"]

triton = None  # filled by import_triton(); the JIT kernels read ``tl`` from this module's globals
tl = None
_JIT: dict[tuple[bool, str], object] = {}
_RECIPE_CODE = {"fbgemm": 0, "deepseek": 1, "ct": 2}


def _int_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, y_ptr,
                     N, K, KW, stride_qk, stride_sg, stride_zg, stride_ys,
                     group_size, words_per_split,
                     BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    w_lo = pid_s * words_per_split
    w_hi = tl.minimum(w_lo + words_per_split, KW)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask_w = offs_w < w_hi
        mask = mask_w[:, None] & mask_n[None, :]
        q = tl.load(q_ptr + offs_w[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
        g = (offs_w * PER) // group_size
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        part = tl.full((BLOCK_W, BLOCK_N), 0.0, tl.float32)
        xsum = tl.full((BLOCK_W,), 0.0, tl.float32)
        for j in tl.static_range(PER):
            k = offs_w * PER + j
            mk = mask_w & (k < K)
            if HAS_PERM:
                src = tl.load(perm_ptr + k, mask=mk, other=0)
            else:
                src = k
            xj = tl.load(x_ptr + src, mask=mk, other=0.0).to(tl.float32)
            c = ((q >> (j * BITS)) & MASK).to(tl.float32)
            part += c * xj[:, None]
            xsum += xj
        if HAS_ZERO:
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0.0)
            acc += tl.sum((part - z * xsum[:, None]) * s, axis=0)
        else:
            acc += tl.sum((part - OFFSET * xsum[:, None]) * s, axis=0)
    tl.store(y_ptr + pid_s * stride_ys + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, sx_ptr, y_ptr,
                     N, K, stride_wn, stride_wsn, stride_ys,
                     block_n, block_k, k_per_split, floor, ub,
                     ROUND_MUL: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_UB: tl.constexpr,
                     MODE: tl.constexpr, EMULATE_CAST: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # MODE 0: per token (the scale from max|x| over the row), 1: per group of BLOCK_K columns,
    # 2: static (one stored scale at sx_ptr). Scale derivation and rounding: Fp8ActQuant.quantize
    # (``mul``: inv = 448 / amax, s = 1 / inv, q = sat(x * inv); ``div``: s = amax / 448, q = sat(x / s)),
    # every division IEEE-rounded (div_rn).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ws_rows = offs_n // block_n
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    a = 1.0
    s_row = 1.0
    if MODE == 0:
        amax_v = tl.full((BLOCK_K,), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            amax_v = tl.maximum(amax_v, tl.abs(v))
        amax = tl.max(amax_v, axis=0)
        if HAS_FLOOR:
            amax = tl.maximum(amax, floor)
        if HAS_UB:
            amax = tl.minimum(amax, ub)
        if ROUND_MUL:
            a = tl.math.div_rn(448.0 + amax * 0.0, amax)
            s_row = tl.math.div_rn(1.0 + amax * 0.0, a)
        else:
            a = tl.math.div_rn(amax, 448.0 + amax * 0.0)
            if not HAS_FLOOR:
                a = tl.where(a == 0.0, 1.1920928955078125e-07, a)
            s_row = a
    if MODE == 2:
        a = tl.load(sx_ptr).to(tl.float32)
        s_row = a
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        v = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        sg = 1.0
        if MODE == 1:  # this K step is one activation group
            amax = tl.max(tl.abs(v), axis=0)
            if HAS_FLOOR:
                amax = tl.maximum(amax, floor)
            if HAS_UB:
                amax = tl.minimum(amax, ub)
            if ROUND_MUL:
                ag = tl.math.div_rn(448.0 + amax * 0.0, amax)
                sg = tl.math.div_rn(1.0 + amax * 0.0, ag)
            else:
                ag = tl.math.div_rn(amax, 448.0 + amax * 0.0)
                if not HAS_FLOOR:
                    ag = tl.where(ag == 0.0, 1.1920928955078125e-07, ag)
                sg = ag
        else:
            ag = a
        if ROUND_MUL:
            t = v * ag
        else:
            t = tl.math.div_rn(v, ag + v * 0.0)
        t = tl.minimum(tl.maximum(t, -448.0), 448.0)
        if EMULATE_CAST:  # the interpreter's fp8 cast (triton 3.9) drops a rounding carry (127.3 -> 64):
            # round to the e4m3 grid in fp32: quantum 2**(max(e, -6) - 3), ties to even by the
            # add-and-subtract of a power of two whose ulp is that quantum
            e = ((t.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            c = ((tl.maximum(e, -6) + 20 + 127) << 23).to(tl.float32, bitcast=True)
            xq = tl.where(t < 0, -((-t + c) - c), (t + c) - c)
        else:
            xq = t.to(tl.float8e4nv).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        d = tl.sum(w * xq[None, :], axis=1)
        ws = tl.load(ws_ptr + ws_rows * stride_wsn + k0 // block_k, mask=mask_n, other=0.0)
        acc += d * ws * sg
    acc = acc * s_row
    tl.store(y_ptr + pid_s * stride_ys + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


#: launch parameters (``block_n``, ``block_k`` in codes, programs per multiprocessor, warps): the best
#: geometric-mean time over Llama-7B's five layer shapes in ``benchmarks/bench_gpu_decode.py sweep``
#: on an H200 (2026-12-04, inside CUDA graphs; results/h200-2026-12-04/sweep-run1.jsonl)
GEMV_DEFAULTS = {"int": (64, 512, 8, 4), "fp8": (32, 128, 8, 4)}


def gemv_config(kind: str, N: int, K: int, device: torch.device, block_n: int | None = None,
                block_k: int | None = None, waves: int | None = None, split: int | None = None,
                align: int = 1) -> tuple[int, int, int, int]:
    """``(block_n, block_k, split, k_per_split)``: ``block_k`` codes per K step (a multiple of
    ``align``), ``split`` K ranges so that ``ceil(N / block_n) * split`` programs fill about
    ``waves`` programs per multiprocessor."""
    bn, bk, w, _ = GEMV_DEFAULTS[kind]
    bn, bk, w = block_n or bn, block_k or bk, waves or w
    bn = min(bn, max(16, triton_next_pow2(N)))
    n_tiles = math.ceil(N / bn)
    k_steps = math.ceil(K / bk)
    if split is None:
        split = max(1, min(k_steps, math.ceil(w * _sms(device) / n_tiles)))
    split = max(1, min(int(split), k_steps))
    k_per_split = math.ceil(k_steps / split) * bk
    split = math.ceil(K / k_per_split)
    return bn, bk, split, k_per_split


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _finish(y: torch.Tensor, split: int, dtype: torch.dtype) -> torch.Tensor:
    return y[0] if split == 1 else torch.sum(y, dim=0, dtype=dtype)


# -- integer codes -------------------------------------------------------------------------------
def int_gemv_reason(buf: dict[str, torch.Tensor], bits: int, group_size: int, K: int) -> str | None:
    """Why :func:`int_gemv` cannot take these prepared ``triton-w4a16`` buffers (None when it can)."""
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes"
    if "g_idx" in buf:
        return "act-order groups that are not runs of the group size"
    per = 32 // bits
    if buf["scales"].shape[0] > 1 and group_size % per:
        return f"group size {group_size} is not a multiple of the {per} codes per word"
    return None


def int_gemv(x: torch.Tensor, buf: dict[str, torch.Tensor], bits: int, group_size: int, offset: int,
             N: int, K: int, *, block_n: int | None = None, block_k: int | None = None,
             waves: int | None = None, split: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """``x [K] (or [1, K]) @ W.T`` -> ``[1, N]`` in ``x.dtype`` for :func:`prepare_w4a16` buffers."""
    xr = x.reshape(-1)
    if xr.numel() != K:
        raise ValueError(f"int_gemv takes one row of {K}, got {tuple(x.shape)}")
    if (r := int_gemv_reason(buf, bits, group_size, K)) is not None:
        raise ValueError(f"int_gemv cannot run this layout: {r}")
    xr = xr.contiguous()
    per = 32 // bits
    qweight, scales = buf["qweight"], buf["scales"]
    zeros, perm = buf.get("zeros"), buf.get("perm")
    gs = group_size if scales.shape[0] > 1 else max(K, 1) * per
    bn, bk, sp, kps = gemv_config("int", N, K, x.device, block_n, block_k, waves, split)
    bw = max(1, bk // per)
    wps = kps // per if kps % per == 0 else math.ceil(kps / per)
    KW = qweight.shape[0]
    sp = math.ceil(KW / wps)
    interpret = x.device.type != "cuda"
    y = torch.empty((sp, N), device=x.device, dtype=x.dtype if sp == 1 else torch.float32)
    extra = {} if interpret else {"num_warps": num_warps or GEMV_DEFAULTS["int"][3]}
    jit_kernel(_int_gemv_kernel, interpret, _JIT)[(math.ceil(N / bn), sp)](
        xr, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight, y,
        N, K, KW, qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, y.stride(0),
        gs, wps, BITS=bits, OFFSET=offset, HAS_ZERO=zeros is not None, HAS_PERM=perm is not None,
        BLOCK_N=bn, BLOCK_W=triton_next_pow2(bw), **extra)
    return _finish(y, sp, x.dtype).view(1, N)


# -- fp8 with the activation rule fused ------------------------------------------------------------
def fp8_gemv_reason(act, K: int, block: tuple[int, int]) -> str | None:
    """Why :func:`fp8_gemv` cannot run the activation rule ``act`` with weight blocks ``block``."""
    from polyquant.activations.fp8 import is_fp8_act
    if not is_fp8_act(act):
        return "the layer has no fp8 activation rule"
    bk = int(block[1])
    if act.static or act.group_size is None or act.group_size >= K:
        tile = next((t for t in (128, 64, 32) if bk >= K or bk % t == 0), None)
        return None if tile is not None else f"the weight block width {bk} is not a multiple of 32"
    g = int(act.group_size)
    if g not in (32, 64, 128, 256) or not (bk >= K or bk % g == 0):
        return f"activation groups of {g} (needs 32/64/128/256 dividing the weight block width {bk})"
    return None


def fp8_gemv(x: torch.Tensor, act, wq: torch.Tensor, ws: torch.Tensor, block: tuple[int, int],
             out_dtype: torch.dtype | None = None, *, block_n: int | None = None, block_k: int | None = None,
             waves: int | None = None, split: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """``fake_quant(x) @ (wq * ws).T`` for one row ``x [K]`` (or ``[1, K]``) with the activation rule
    ``act`` applied inside the kernel; ``ws`` ``[ceil(N/bn), ceil(K/bk)]`` (any leading grid shape
    that reshapes to it). Returns ``[1, N]`` in ``out_dtype`` (default ``x.dtype``)."""
    from polyquant.activations.fp8 import RECIPES
    N, K = wq.shape
    xr = x.reshape(-1)
    if xr.numel() != K:
        raise ValueError(f"fp8_gemv takes one row of {K}, got {tuple(x.shape)}")
    if wq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"wq must be float8_e4m3fn, got {wq.dtype}")
    if (r := fp8_gemv_reason(act, K, block)) is not None:
        raise ValueError(f"fp8_gemv cannot run this layer: {r}")
    bn_w, bk_w = int(block[0]), int(block[1])
    ws = ws.float().reshape(math.ceil(N / bn_w), math.ceil(K / bk_w)).contiguous()
    mode = 2 if act.static else (0 if act.group_size is None or act.group_size >= K else 1)
    if mode == 1:
        tile = int(act.group_size)
    else:
        tile = next(t for t in (128, 64, 32) if bk_w >= K or bk_w % t == 0)
        if block_k is not None:
            tile = block_k
    rounding, fl = RECIPES[act.recipe]
    ub = act.scale_ub
    bn, bk, sp, kps = gemv_config("fp8", N, K, x.device, block_n, tile, waves, split)
    interpret = x.device.type != "cuda"
    odt = out_dtype or (x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32)
    y = torch.empty((sp, N), device=x.device, dtype=odt if sp == 1 else torch.float32)
    sx = act.scale.to(x.device) if act.static else ws
    extra = {} if interpret else {"num_warps": num_warps or GEMV_DEFAULTS["fp8"][3]}
    jit_kernel(_fp8_gemv_kernel, interpret, _JIT)[(math.ceil(N / bn), sp)](
        xr.contiguous(), wq.contiguous(), ws, sx, y, N, K, wq.stride(0), ws.stride(0), y.stride(0),
        bn_w, bk_w, kps, float(fl), float(ub) if ub is not None else 0.0,
        ROUND_MUL=rounding == "mul" and mode != 2, HAS_FLOOR=fl > 0, HAS_UB=ub is not None,
        MODE=mode, EMULATE_CAST=interpret, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return _finish(y, sp, odt).view(1, N)
