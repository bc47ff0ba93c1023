"""``cpu-lut4``: 4-bit code-book weights (bitsandbytes NF4 / FP4, any 16-entry table) on the CPU, and
1- to 4-bit integer weights with float32 numerics (the table is ``code - offset``, minus the zero point),
act-order (``g_idx``) included: columns sorted by group once, the input gathered per call (ExLlama's
trick, as ``cpu-int4-actorder``).

PyTorch has no packed op for non-uniform 4-bit codes, so this kernel is a small compiled C function
(``kernels/csrc/lut4.c``, built once by :mod:`polyquant.kernels.cext`): the 16-entry table, scaled
by each group's absmax, sits in one AVX-512 register and one permute looks up 16 codes at once
(AVX2: two 8-entry halves and a blend; other CPUs: a portable C loop, see ``simd_level``);
float32 activations and accumulation (bitsandbytes' CPU path casts both to bf16). Up to
``DEQUANT_MIN_M - 1`` activation rows (decode, small batches) run in that loop; longer inputs
(prefill) dequantize the weight to float32 with the same code and call PyTorch's matmul.

Layout (``pack_lut4``): codes ``[N, K]`` -> bytes ``[N, K/2]``, each run of 32 codes ``c[0..31]`` as
16 bytes ``c[b] | c[16 + b] << 4``; scales ``[N, K/G]`` float32 with ``G`` (inputs per scale) a
multiple of 32 dividing ``K``, or whole rows.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, layer_output, register_kernel
from polyquant.kernels.cext import CLibrary, I64, PTR, library_error
from polyquant.kernels.cpu_actorder import gather_columns, group_perm, sort_by_group
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuLut4Kernel", "simd_level", "simd_levels", "pack_lut4", "lut4_scales", "lut4_mm", "lut4_dequantize", "DEQUANT_MIN_M"]

DEQUANT_MIN_M = 16  # activation rows from which the weight is dequantized and PyTorch's matmul runs
_LIB = "lut4"


_C = CLibrary(_LIB, {
    "pq_lut4_mm": ([I64, I64, I64, I64, PTR, I64, PTR, PTR, PTR, PTR, PTR, I64, I64, I64], None),
    "pq_lut4_dequant": ([I64, I64, I64, PTR, PTR, PTR, PTR, PTR, I64, I64], None),
})
_lib = _C.lib  # the library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 1 AVX-512F, 2 AVX2 + FMA, 0 the portable C loop."""
    return _C.simd_level()


def _group(qw: QuantizedWeight) -> int | str:
    """Inputs per scale of the packed layout, or why there is none."""
    n, k = qw.shape
    r, c = qw.block
    if c >= k:
        g = k
    elif r == 1 and k % c == 0:
        g = c
    else:
        return f"block {qw.block} of a [{n}, {k}] weight is not whole rows or row groups dividing in_features"
    if g % 32:
        return f"inputs per scale ({g}) must be a multiple of 32"
    return g


def pack_lut4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (values 0..15, ``K % 32 == 0``) -> the kernel's bytes ``[N, K/2]``."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def lut4_scales(qw: QuantizedWeight, g: int, t: torch.Tensor | None = None) -> torch.Tensor:
    """A per-block tensor of ``qw`` (its scales, or ``t``: its zero points) as ``[N, K/g]`` float32."""
    n, k = qw.shape
    r, c = qw.block
    s = (qw.scale if t is None else t).to(torch.float32)
    if c >= k:
        s = s.reshape(-1)[: -(-n // r)].repeat_interleave(r)[:n].reshape(n, 1)
    else:
        s = s.reshape(n, -1)[:, : k // g]
    return s.contiguous()


def _zp(z: torch.Tensor | None) -> int | None:
    return None if z is None else z.data_ptr()


def lut4_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, lut: torch.Tensor, z: torch.Tensor | None = None,
            simd: int | None = None, threads: int | None = None) -> torch.Tensor:
    """``x [M, K] float32 @ W.T`` with ``W[n, k] = (lut[code] - z[n, k // G]) * s[n, k // G]`` (no ``z``:
    ``lut[code] * s``) -> ``[M, N]`` float32."""
    m, k = x.shape
    n = w.shape[0]
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    _lib().pq_lut4_mm(m, n, k, k // s.shape[1], x.data_ptr(), k, w.data_ptr(), s.data_ptr(), _zp(z), lut.data_ptr(),
                      y.data_ptr(), n, threads or torch.get_num_threads(), _C.level(simd))
    return y


def lut4_dequantize(w: torch.Tensor, s: torch.Tensor, lut: torch.Tensor, z: torch.Tensor | None = None,
                    simd: int | None = None, threads: int | None = None) -> torch.Tensor:
    """The dense float32 weight ``[N, K]`` of the packed layout."""
    n, k = w.shape[0], w.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.float32)
    _lib().pq_lut4_dequant(n, k, k // s.shape[1], w.data_ptr(), s.data_ptr(), _zp(z), lut.data_ptr(), out.data_ptr(),
                           threads or torch.get_num_threads(), _C.level(simd))
    return out


class CpuLut4Kernel(Kernel):
    """Code books (NF4, FP4) and, on CPUs with AVX-512, 1- to 4-bit integer codes: there it beats
    ``cpu-int4`` (PyTorch's bf16 packed op) at decode and prefill and keeps float32 numerics. Without
    AVX-512, integer layouts ``cpu-int4`` can run are left to it (the reason says so)."""

    name = "cpu-lut4"
    devices = ("cpu",)
    priority = 25
    layouts = ("4-bit code books (NF4, FP4), and 1- to 4-bit integer codes with zero points and act-order (AVX-512 "
               "CPUs, or where cpu-int4 declines), one scale per group of a multiple of 32 inputs (or whole rows); "
               "compiled C (AVX-512 / AVX2 / portable); float32")

    def check(self, qw, device):
        if qw.qt.kind == "codebook":
            if qw.bits != 4 or len(qw.qt.values or ()) != 16:
                return f"needs a 16-entry code book (nf4, fp4) or 1- to 4-bit integer codes, got {qw.qtype}"
        elif qw.qt.kind != "int" or qw.bits > 4:
            return f"needs a 16-entry code book (nf4, fp4) or 1- to 4-bit integer codes, got {qw.qtype}"
        if qw.g_idx is not None:  # act-order: columns sorted by group once, the input gathered per call
            perm = group_perm(qw)
            if isinstance(perm, str):
                return perm
        g = _group(qw)
        if isinstance(g, str):
            return g
        if r := library_error(_LIB):
            return r
        if qw.qt.kind == "int" and simd_level() != 1:
            from polyquant.kernels.cpu import CpuInt4Kernel
            from polyquant.kernels.cpu_actorder import CpuInt4ActOrderKernel
            other = CpuInt4ActOrderKernel() if qw.g_idx is not None else CpuInt4Kernel()
            if other.supports(qw, device) is None:
                return f"without AVX-512 the integer layouts {other.name} runs are faster there"
        return None

    def prepare(self, qw):
        perm = None
        if qw.g_idx is not None:
            qw, perm = sort_by_group(qw)
        g = _group(qw)
        # the table is the reference's decode() of every 4-bit code (code - offset for integers)
        lut = qw.qt.decode(torch.arange(16, dtype=torch.uint8)).to(torch.float32).contiguous()
        buf = {"w": pack_lut4(qw.codes), "s": lut4_scales(qw, g), "lut": lut}
        if qw.zero is not None:
            buf["z"] = lut4_scales(qw, g, qw.zero)
        if perm is not None:
            buf["perm"] = perm
        return buf

    def forward(self, module, x):
        if module.act_quant is not None:
            x = module.act_quant(x)
        b = module._buffers
        w, s, lut, z, perm = b["k_w"], b["k_s"], b["k_lut"], b.get("k_z"), b.get("k_perm")
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1]) if perm is None else gather_columns(x, perm)
        xf = x2 if dtype == torch.float32 else x2.to(torch.float32)
        if x2.shape[0] < DEQUANT_MIN_M and not (xf.requires_grad and torch.is_grad_enabled()):
            y = lut4_mm(xf, w, s, lut, z)  # (the C loop records no autograd graph: inputs needing a
            # gradient take the dequantize + matmul path below, differentiable in x)
        else:
            y = F.linear(xf, lut4_dequantize(w, s, lut, z))
        return layer_output(module, y, x)


register_kernel(CpuLut4Kernel)
