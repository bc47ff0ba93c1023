"""``cpu-aqlm``: AQLM additive code-book weights (``vector`` layout, out_group_size 1) on the CPU.

A compiled C kernel (``kernels/csrc/aqlm.c``, built once by :mod:`polyquant.kernels.cext`):

- code books of up to 256 entries (1x8, 2x8, 4x8, 8x8 ...): per activation row, the dot products of
  each input group's vector with every code word form a table ``lut[i][m][k]`` (the ``aqlm``
  package's Numba idea; register-blocked over ``k`` from the transposed code books); every output is
  then ``scale[n] * sum_{i,m} lut[i][m][codes[n, i, m]]`` (AVX2 gathers, two rows at a time, over
  slices of 32 KiB of tables that stay in L1 while a block of 256 rows reads them: a whole layer's
  tables, 147 KiB at 576 inputs in 2x8, would not);
- larger code books (1x16): each output gathers its code words and dots them with the input groups.

Up to ``DEQUANT_MIN_M - 1`` activation rows (decode) take these loops; longer inputs (prefill)
dequantize the weight (the reference formula) and call PyTorch's matmul. float32 throughout; AVX2+FMA
or portable C (``simd_level``); OpenMP over output rows with ``torch.get_num_threads()`` threads.
What remains: no AVX-512 path (the AVX2 one runs there; 16-wide gathers measured 11 % faster on the
look-ups alone here), out_group_size > 1 takes the reference kernel. Tried and not kept: int16 tables
looked up 64 rows at a time with AVX-512 VBMI byte permutes (``vpermt2b``): the look-ups ran 2x faster,
but rounding each table to int16 cost as much again on 576-wide layers, so the float path stayed ahead.

The module also binds the quantizer's greedy code pass (``aqlm_sweep``), used by ``methods/aqlm.py``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, layer_output, layer_rows, register_kernel
from polyquant.kernels.cext import CLibrary, I64, PTR, library_error
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuAqlmKernel", "simd_level", "simd_levels", "aqlm_lut_mm", "aqlm_gather_mm", "aqlm_sweep",
           "sweep_available", "DEQUANT_MIN_M", "LUT_MAX_K"]

DEQUANT_MIN_M = 8
LUT_MAX_K = 256
_LIB = "aqlm"


_C = CLibrary(_LIB, {
    "pq_aqlm_lut_mm": ([I64] * 6 + [PTR, I64, PTR, PTR, PTR, PTR, PTR, I64, I64, I64], None),
    "pq_aqlm_gather_mm": ([I64] * 6 + [PTR, I64, PTR, PTR, PTR, PTR, I64, I64, I64], None),
    "pq_aqlm_sweep": ([I64] * 5 + [PTR] * 8 + [I64, I64], I64),
})
_lib = _C.lib  # the library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 2 AVX2 + FMA, 0 portable C."""
    return _C.simd_level()


def sweep_available() -> bool:
    return library_error(_LIB) is None


def _c(t: torch.Tensor) -> torch.Tensor:
    assert t.device.type == "cpu"
    return t if t.is_contiguous() else t.contiguous()


def aqlm_sweep(H: torch.Tensor, G: torch.Tensor, R: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor,
               nb: torch.Tensor, s: torch.Tensor, threads: int | None = None, simd: int | None = None) -> int:
    """One greedy code pass in place (out_group_size 1): ``codes [out, ng, M]`` int32, ``G``/``R`` [out, in]
    float32 updated; ``cb [M, K, ig]``, ``nb [ng, M, K]`` (``c^T H_ii c``), ``s [out]``. Returns the
    number of codes changed."""
    out, inp = G.shape
    M, K, ig = cb.shape
    for t in (H, G, R, codes, cb, nb, s):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("aqlm_sweep needs contiguous CPU tensors")
    cbT = cb.permute(0, 2, 1).contiguous()
    n = _lib().pq_aqlm_sweep(out, inp, ig, M, K, H.data_ptr(), G.data_ptr(), R.data_ptr(), codes.data_ptr(),
                             cb.data_ptr(), cbT.data_ptr(), nb.data_ptr(), s.data_ptr(),
                             threads or torch.get_num_threads(), _C.level(simd))
    if n < 0:
        raise RuntimeError(f"pq_aqlm_sweep failed ({n}): in_group_size {ig} over 64 or out of memory")
    return int(n)


def aqlm_lut_mm(x: torch.Tensor, codes: torch.Tensor, cbT: torch.Tensor, s: torch.Tensor, simd: int | None = None,
                threads: int | None = None) -> torch.Tensor:
    """``x [R, in] float32 @ W.T`` through per-row look-up tables; ``codes [N, G, M]`` uint8,
    ``cbT [M, ig, K]`` float32, ``s [N]`` float32."""
    r, inp = x.shape
    n, g, m = codes.shape
    _, ig, k = cbT.shape
    x = _c(x)
    lut = torch.empty(g * m * k, dtype=torch.float32)
    y = torch.empty(r, n, dtype=torch.float32)
    _lib().pq_aqlm_lut_mm(r, n, g, ig, m, k, x.data_ptr(), inp, codes.data_ptr(), cbT.data_ptr(), s.data_ptr(),
                          lut.data_ptr(), y.data_ptr(), n, threads or torch.get_num_threads(),
                          _C.level(simd))
    return y


def aqlm_gather_mm(x: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor, s: torch.Tensor, simd: int | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """The code-word gather path (any code book size): ``codes [N, G, M]`` int16 (two's complement of the
    16-bit index, read as uint16), ``cb [M, K, ig]`` float32."""
    r, inp = x.shape
    n, g, m = codes.shape
    _, k, ig = cb.shape
    x = _c(x)
    y = torch.empty(r, n, dtype=torch.float32)
    _lib().pq_aqlm_gather_mm(r, n, g, ig, m, k, x.data_ptr(), inp, codes.data_ptr(), cb.data_ptr(), s.data_ptr(),
                             y.data_ptr(), n, threads or torch.get_num_threads(),
                             _C.level(simd))
    return y


class CpuAqlmKernel(Kernel):
    """AQLM code books on the CPU: a look-up-table GEMV for code books of up to 256 entries, a code-word
    gather for larger ones (1x16); prefill dequantizes and calls PyTorch's matmul."""

    name = "cpu-aqlm"
    devices = ("cpu",)
    priority = 25
    layouts = ("AQLM additive code books (vq1..vq16, out_group_size 1, in_group_size <= 64): table look-ups "
               "for <= 256-entry code books, code-word gather otherwise; compiled C (AVX2 / portable); float32")
    layout_kinds = ("vector",)

    def check(self, qw, device):
        m, k, og, ig = qw.codebooks.shape
        if og != 1:
            return f"out_group_size {og} > 1 is not supported (the reference kernel runs it)"
        if ig > 64:
            return f"in_group_size {ig} > 64"
        if r := library_error(_LIB):
            return r
        return None

    def prepare(self, qw: QuantizedWeight):
        m, k, og, ig = qw.codebooks.shape
        cb = qw.codebooks.to(torch.float32).reshape(m, k, ig).contiguous()
        buf = {"cb": cb, "s": qw.scale.to(torch.float32).reshape(-1).contiguous(), "codes": qw.data.contiguous()}
        if k <= LUT_MAX_K:
            buf["cbT"] = cb.permute(0, 2, 1).contiguous()
        return buf

    def forward(self, module, x):
        x, x2, xf = layer_rows(module, x, torch.float32)
        b = module._buffers
        cb, s, codes, cbT = b["k_cb"], b["k_s"], b["k_codes"], b.get("k_cbT")
        if x2.shape[0] < DEQUANT_MIN_M and not (xf.requires_grad and torch.is_grad_enabled()):
            y = aqlm_lut_mm(xf, codes, cbT, s) if cbT is not None else aqlm_gather_mm(xf, codes, cb, s)
        else:
            y = F.linear(xf, module.quantized_weight.dequantize(torch.float32))
        return layer_output(module, y, x)


register_kernel(CpuAqlmKernel)
