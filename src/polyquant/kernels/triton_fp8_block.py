"""``triton-fp8-block``: fp8 x fp8 matmul with block-scaled e4m3 weights and grouped fp8 activations
(DeepSeek-V3 / transformers ``fp8`` style), on CUDA.

Inputs: activation codes ``xq [M, K]`` (float8_e4m3fn) with fp32 scales ``xs [M, ceil(K / xg)]``
(one per token and group of ``xg`` input channels; ``xg >= K`` is per token); weight codes
``wq [N, K]`` (float8_e4m3fn) with fp32 scales ``ws [ceil(N / bn), ceil(K / bk)]`` (partial edge
blocks allowed). The kernel computes, per output tile and K tile of ``BLOCK_K`` columns (chosen to
divide both ``bk`` and ``xg``, so a tile lies inside one weight block column and one activation
group)::

    acc[m, n] += dot(xq[m, tile], wq[n, tile]) * xs[m, k0 // xg] * ws[n // bn, k0 // bk]

in fp32, then stores ``acc`` in the output dtype. The activation codes come from the layer's
:class:`polyquant.kernels.fp8.Fp8ActQuant` (the same definition the CPU emulation uses). One row
(batch-1 decode) runs :func:`polyquant.kernels.triton_gemv.fp8_gemv` instead: the activation rule is
applied inside the matrix-vector kernel (no separate quantization ops).

``triton`` is imported lazily and the kernel is JIT-wrapped on first use; CPU tensors run in
Triton's interpreter (tests: ``TRITON_INTERPRET=1``). Registered for ``cuda`` only (cc >= 8.9: fp8
tensor-core MMA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.triton_gemv import fp8_gemv, fp8_gemv_reason
from polyquant.kernels.triton_util import import_triton, jit_kernel, triton_available, triton_reason
from polyquant.activations.fp8 import Fp8ActQuant

__all__ = ["TritonFp8BlockKernel", "fp8_block_matmul", "tile_k", "triton_available"]

triton = None  # filled by _import_triton(); the JIT kernel reads ``tl`` from this module's globals
tl = None
_JIT: dict[tuple[bool, str], object] = {}
_TILES_K = (128, 64, 32)


def _import_triton() -> None:
    import_triton(globals())


def _fp8_block_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                      stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ym,
                      block_n, block_k, x_group,
                      UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    ws_rows = offs_n // block_n
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full: a builtin the interpreter always runs
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        xs = tl.load(xs_ptr + offs_m * stride_xsm + k0 // x_group, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + ws_rows * stride_wsn + k0 // block_k, mask=mask_n, other=0.0)
        if UPCAST:
            d = tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            d = tl.dot(x, w)
        acc += d * xs[:, None] * ws[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _jit(interpret: bool):
    """The kernel, JIT-compiled (GPU) or interpreted (CPU tensors / TRITON_INTERPRET=1)."""
    return jit_kernel(_fp8_block_kernel, interpret, _JIT)


def tile_k(K: int, block_k: int, x_group: int) -> int | None:
    """The K tile: the largest of 128/64/32 that divides the weight block width and the activation
    group (each counted only when smaller than K); None when there is none."""
    for t in _TILES_K:
        if (block_k >= K or block_k % t == 0) and (x_group >= K or x_group % t == 0):
            return t
    return None


def fp8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                     block: tuple[int, int], x_group: int | None = None, out_dtype: torch.dtype = torch.bfloat16,
                     *, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """``y [M, N] = sum over K tiles of (xq @ wq.T) * xs * ws`` (see the module docstring);
    ``x_group``: input channels per activation scale (None: per token, ``xs [M, 1]``).
    CPU tensors run in Triton's interpreter (slow; tests only)."""
    M, K = xq.shape
    N = wq.shape[0]
    bn, bk = int(block[0]), int(block[1])
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"xq and wq must be float8_e4m3fn, got {xq.dtype} and {wq.dtype}")
    if wq.shape[1] != K:
        raise ValueError(f"xq is [M, {K}] but wq is {list(wq.shape)}")
    if tuple(ws.shape) != (math.ceil(N / bn), math.ceil(K / bk)):
        raise ValueError(f"ws has shape {list(ws.shape)}, a {bn}x{bk} grid of [{N}, {K}] needs "
                         f"[{math.ceil(N / bn)}, {math.ceil(K / bk)}]")
    xg = K if x_group is None or x_group >= K else int(x_group)
    if tuple(xs.shape) != (M, math.ceil(K / max(xg, 1))):
        raise ValueError(f"xs has shape {list(xs.shape)}, expected [{M}, {math.ceil(K / max(xg, 1))}] "
                         f"(activation groups of {xg})")
    bk_tile = tile_k(K, bk, xg)
    if bk_tile is None:
        raise ValueError(f"no K tile of {_TILES_K} divides the weight block width {bk} and the activation "
                         f"group {xg}")
    xq, wq = xq.contiguous(), wq.contiguous()
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    interpret = xq.device.type != "cuda"
    bm = block_m or (16 if M <= 16 else 64)
    bnt = block_n or (64 if M <= 16 else 128)
    y = torch.empty((M, N), device=xq.device, dtype=out_dtype)
    grid = (math.ceil(M / bm), math.ceil(N / bnt))
    extra = {} if interpret else {"num_warps": 4, "num_stages": 3}
    _jit(interpret)[grid](
        xq, xs, wq, ws, y, M, N, K, xq.stride(0), xs.stride(0), wq.stride(0), ws.stride(0), y.stride(0),
        bn, bk, max(xg, 1), UPCAST=interpret, BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=bk_tile, **extra)
    return y


class TritonFp8BlockKernel(Kernel):
    name = "triton-fp8-block"
    devices = ("cuda",)
    priority = 25
    layouts = ("float8_e4m3fn weights with block (or channel / tensor) scales, partial edge blocks; fp8 "
               "activations per token or per 1 x G group (Triton, CUDA cc >= 8.9)")
    min_capability = (8, 9)

    def check(self, qw, device):
        if r := triton_reason():
            return r
        if qw.qtype != "float8_e4m3fn":
            return f"needs float8_e4m3fn weights, got {qw.qtype}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras are not supported"
        if tile_k(qw.shape[1], qw.block[1], qw.shape[1]) is None:
            return f"the block width {qw.block[1]} is not a multiple of 32"
        return self._capability_reason(device)

    def forward(self, module, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = module.act_quant
        m = module._meta
        K = shape[-1]
        fits = getattr(act, "kind", None) == Fp8ActQuant.kind and (
            act.static or act.group_size is None or act.group_size >= K
            or tile_k(K, m["block"][1], act.group_size) is not None)
        odt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if x2.shape[0] == 1 and fp8_gemv_reason(act, K, m["block"]) is None:  # decode: the rule fused
            y = fp8_gemv(x2, act, module.qw_data, module.qw_scale, m["block"], odt)
        elif fits:
            xq, xs = act.quantize(x2)
            y = fp8_block_matmul(xq, xs, module.qw_data, module.qw_scale, m["block"],
                                 None if act.static else act.group_size, odt)
        else:  # weight-only or another activation rule: dequantize per call
            xf = act(x2) if act is not None else x2
            y = F.linear(xf.float(), module.quantized_weight.dequantize(torch.float32))
        if module.bias is not None:
            y = y.float() + module.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


register_kernel(TritonFp8BlockKernel)
