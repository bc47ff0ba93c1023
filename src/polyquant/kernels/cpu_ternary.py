"""``cpu-ternary``: a compiled kernel for ternary weights times int8 activations (BitNet b1.58's
BitLinear, whose activation rule is :class:`polyquant.activations.bitnet.BitNetActivation`).

The layer computes ``y = (q @ W_q^T) / (xs * ws) + bias`` with ``q, xs`` the rule's int8 codes and
per-token multipliers, ``W_q`` in {-1, 0, 1} and ``ws = 1 / mean|W|`` (BitLinear's ``weight_scale``;
polyquant's ``QuantizedWeight`` stores the dequantization scale ``mean|W|``, so ``ws = 1 / scale``,
computed once in float64 and rounded to float32).

The kernel (``kernels/csrc/ternary.c``, built by :mod:`polyquant.kernels.cext`) runs the whole layer
for float32 inputs: the rule, the integer products in int32 (exact: ``sum q * (c - 1) = sum q * c -
sum q`` over the 2-bit codes ``c = w + 1``) and ``acc / (xs * ws)`` in float32, bit-exact with the
PyTorch formula above. Code paths (``simd_level``): AVX-512 VNNI (``vpdpbusd``), AVX-512BW and AVX2
(``vpmaddubsw`` + ``vpmaddwd``), portable C. From ``DENSE_MIN_M`` rows on (prefill) the weight is unpacked
to float32 {-1, 0, 1} and PyTorch's float matmul multiplies the integer codes: the same integers (every
partial sum is below 2**24, exact in float32) - what transformers' BitLinear computes - at float GEMM speed
(``torch._int_mm`` on this CPU runs 20x slower than the float GEMM).

Weight layout (:func:`pack_ternary`): codes ``[N, K]`` -> bytes ``[N, Kp/4]`` with ``Kp`` = ``K`` rounded up
to 64 (padding code 1, weight 0); each run of 64 codes ``c[0..63]`` is 16 bytes,
``byte j = c[j] | c[16+j] << 2 | c[32+j] << 4 | c[48+j] << 6``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from polyquant.activations.bitnet import BitNetActivation
from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.cext import CLibrary, I64, PTR, library_error
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuTernaryKernel", "pack_ternary", "ternary_int_mm", "ternary_linear",
           "ternary_unpack", "ternary_unpack_f32", "weight_multiplier", "simd_level", "simd_levels", "DENSE_MIN_M"]

DENSE_MIN_M = 32  # activation rows from which the products run as a float GEMM on the unpacked codes (prefill)
_LIB = "ternary"


def weight_multiplier(scale: torch.Tensor) -> torch.Tensor:
    """BitLinear's ``weight_scale`` (the quantization multiplier ``1 / mean|W|``) from polyquant's
    dequantization scale, float32: ``1 / scale`` in float64, rounded once."""
    return (1.0 / scale.to(torch.float64)).to(torch.float32)


# -- the compiled library ---------------------------------------------------------------------
_C = CLibrary(_LIB, {
    "pq_ternary_linear": ([I64, I64, I64, I64, PTR, I64, PTR, PTR, I64, PTR, I64, PTR, I64, I64], None),
    "pq_ternary_int_mm": ([I64, I64, I64, PTR, PTR, PTR, I64, I64], None),
    "pq_ternary_quant": ([I64, I64, I64, PTR, I64, PTR, PTR], None),
    "pq_ternary_unpack": ([I64, I64, I64, PTR, PTR, I64], None),
    "pq_ternary_unpack_f32": ([I64, I64, I64, PTR, PTR, I64], None),
})
_lib = _C.lib  # the library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 3 AVX-512 VNNI, 1 AVX-512BW, 2 AVX2, 0 portable C."""
    return _C.simd_level()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (0, 1, 2 = weight + 1) -> the kernel's bytes ``[N, Kp/4]`` (see the module doc)."""
    n, k = codes.shape
    kp = -(-k // 64) * 64
    c = codes.to(torch.uint8)
    if kp != k:
        c = torch.cat([c, torch.ones(n, kp - k, dtype=torch.uint8)], dim=1)
    c = c.reshape(n, kp // 64, 4, 16)
    out = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return out.reshape(n, kp // 4).contiguous()


def ternary_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, k: int, simd: int | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """The BitLinear product without bias: ``x [M, K]`` float32 -> ``[M, N]`` float32 (rule, int32
    products, ``acc / (xs * ws)``). ``w``: :func:`pack_ternary` bytes; ``ws``: 1 or ``N`` multipliers."""
    m = x.shape[0]
    n, kp = w.shape[0], w.shape[1] * 4
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    scratch = torch.empty(m, kp, dtype=torch.int8)
    _lib().pq_ternary_linear(m, n, k, kp, x.data_ptr(), x.shape[1], w.data_ptr(), ws.data_ptr(), ws.numel(),
                             y.data_ptr(), n, scratch.data_ptr(), threads or torch.get_num_threads(),
                             _C.level(simd))
    return y


def ternary_int_mm(q: torch.Tensor, w: torch.Tensor, simd: int | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """Integer products only: ``q [M, Kp]`` int8 (zero padded to ``Kp``) @ ``(codes - 1)^T`` -> int32 ``[M, N]``."""
    m, kp = q.shape
    n = w.shape[0]
    if kp != w.shape[1] * 4:
        raise ValueError(f"q has {kp} columns, the packed weight {w.shape[1] * 4}")
    q = q.contiguous()
    acc = torch.empty(m, n, dtype=torch.int32)
    _lib().pq_ternary_int_mm(m, n, kp, q.data_ptr(), w.data_ptr(), acc.data_ptr(), threads or torch.get_num_threads(),
                             _C.level(simd))
    return acc


def ternary_unpack(w: torch.Tensor, k: int, threads: int | None = None) -> torch.Tensor:
    """The dense int8 weight ``[N, K]`` (values -1, 0, 1) of the packed layout."""
    n, kp = w.shape[0], w.shape[1] * 4
    out = torch.empty(n, k, dtype=torch.int8)
    _lib().pq_ternary_unpack(n, k, kp, w.data_ptr(), out.data_ptr(), threads or torch.get_num_threads())
    return out


def ternary_unpack_f32(w: torch.Tensor, k: int, threads: int | None = None) -> torch.Tensor:
    """The dense float32 weight ``[N, K]`` (values -1, 0, 1) of the packed layout."""
    n, kp = w.shape[0], w.shape[1] * 4
    out = torch.empty(n, k, dtype=torch.float32)
    _lib().pq_ternary_unpack_f32(n, k, kp, w.data_ptr(), out.data_ptr(), threads or torch.get_num_threads())
    return out


def _row_scale_reason(qw: QuantizedWeight) -> str | None:
    n, k = qw.shape
    if qw.block not in ((n, k), (1, k)):
        return f"needs one scale per tensor or per output row, got block {qw.block}"
    return None


class CpuTernaryKernel(Kernel):
    """Ternary weights with BitNet's activation rule (int8 per token), the whole BitLinear in C."""

    name = "cpu-ternary"
    devices = ("cpu",)
    priority = 30
    layouts = ("ternary weights, one scale per tensor or per output row, with BitNet's int8 per-token "
               "activations; compiled C (AVX-512 VNNI / AVX-512BW / AVX2 / portable), int32 accumulation")
    act_rules = ({"kind": BitNetActivation.kind},)

    def check(self, qw, device):
        if qw.qt.kind != "ternary":
            return f"needs ternary weights, got {qw.qtype}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "needs symmetric ternary weights without act-order or extras"
        if r := _row_scale_reason(qw):
            return r
        if r := library_error(_LIB):
            return r
        return None

    def prepare(self, qw):
        n = qw.shape[0]
        ws = weight_multiplier(qw.scale.reshape(-1))
        if ws.numel() not in (1, n):
            ws = ws[:1]
        return {"w": pack_ternary(qw.codes), "ws": ws.contiguous()}

    def forward(self, module, x):
        b = module._buffers
        w, ws = b["k_w"], b["k_ws"]
        k = module.in_features
        rule = module.act_quant
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if not isinstance(rule, BitNetActivation):  # requested explicitly for another rule: dense float
            if rule is not None:
                x2 = rule(x2)
            wd = ternary_unpack_f32(w, k).to(dtype) / ws.to(dtype).reshape(-1, 1)
            y = F.linear(x2, wd)
        else:
            x2 = rule.norm(x2)
            grad = x2.requires_grad and torch.is_grad_enabled()
            if dtype == torch.float32 and x2.shape[0] < DENSE_MIN_M and not grad:
                y = ternary_linear(x2, w, ws, k)
            else:
                q, xs = rule.quantize(x2)
                if grad:  # straight-through: the fake-quantized input, differentiable in x
                    xq = x2 + (q.to(dtype) / xs - x2).detach()
                    y = F.linear(xq, ternary_unpack_f32(w, k).to(dtype) / ws.to(dtype).reshape(-1, 1))
                else:  # integer codes in float: exact sums (< 2**24), BitLinear's F.linear
                    acc = F.linear(q.to(dtype), ternary_unpack_f32(w, k).to(dtype))
                    y = acc / (ws.to(dtype) * xs) if ws.numel() == 1 else acc / (xs * ws.to(dtype))
        if module.bias is not None:
            y = y + module.bias.to(y.dtype)
        if y.dtype != dtype:
            y = y.to(dtype)
        return y.view(*x.shape[:-1], y.shape[-1]) if x.dim() != 2 else y


register_kernel(CpuTernaryKernel)
