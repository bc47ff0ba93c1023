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
dequantize the weight (the reference formula) and call PyTorch's matmul. float32 throughout; AVX-512F
(the table build as a small GEMM: four input groups x 64 entries in 16 zmm accumulators, since every
group reads the same code book; 1.4-1.5x the AVX2 build), AVX2+FMA or portable C (``simd_level``);
OpenMP over output rows with ``torch.get_num_threads()`` threads.
Decode in float32 without a bias goes straight from the layer to ``pq_aqlm_lut_mv``, whose constant
arguments (shapes, buffer addresses, code path) sit in one int64 array packed at the first call and
rebuilt when a buffer moves: a 576 x 576 layer's call went from 41 to 34 us (the C work is 30 us), +3 %
decode on the default model. out_group_size > 1 takes the reference kernel.
Decode of the default model's 2x8 checkpoint at 1 thread (benchmarks/README, AQLM): 1.53x the ``aqlm``
package's Numba kernel (median of five runs, lowest 1.49x), 1.7x fp32.

Tried and not kept: int16 tables looked up 64 rows at a time with AVX-512 VBMI byte permutes
(``vpermt2b``): the look-ups ran 2x faster, but rounding each table to int16 cost as much again on
576-wide layers. 16-wide AVX-512 gathers in the same loops: 0.90-0.94x the AVX2 kernel on the 576-input
layers, 1.08x on down_proj (1536 inputs), 5 % slower over the model's 210 layers.

The module also binds the quantizer's greedy code pass (``aqlm_sweep``), used by ``methods/aqlm.py``.
"""
from __future__ import annotations

import threading

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
    "pq_aqlm_lut_mv": ([PTR, PTR, I64, PTR, PTR, I64], None),
})
_lib = _C.lib  # the library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 1 AVX-512F, 2 AVX2 + FMA, 0 portable C."""
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


_SCRATCH = threading.local()  # each thread's table scratch (grown to the largest layer it has run)


def _scratch(numel: int) -> int:
    buf = getattr(_SCRATCH, "lut", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.lut = torch.empty(numel, dtype=torch.float32)
    return buf.data_ptr()


class _DecodeCall:
    """A layer's decode call with its constant arguments packed once (``pq_aqlm_lut_mv``): per token it
    converts six arguments instead of sixteen and allocates only the output. Valid while the layer's
    buffers keep their storage (``key``: their addresses; a device move or ``share_memory_`` rebuilds it)."""

    __slots__ = ("key", "plan", "plan_ptr", "n", "lut_numel", "fn")

    def __init__(self, codes: torch.Tensor, cbT: torch.Tensor, s: torch.Tensor, inp: int):
        n, g, m = codes.shape
        _, ig, k = cbT.shape
        self.key = (codes.data_ptr(), cbT.data_ptr(), s.data_ptr())
        self.plan = torch.tensor([n, g, ig, m, k, inp, *self.key, _C.level(None)], dtype=torch.int64)
        self.plan_ptr, self.n, self.lut_numel = self.plan.data_ptr(), n, g * m * k
        self.fn = _lib().pq_aqlm_lut_mv

    def __call__(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``x`` contiguous float32 ``[..., in]`` holding ``rows`` rows -> ``[..., N]``."""
        y = torch.empty(x.shape[:-1] + (self.n,), dtype=torch.float32)
        self.fn(self.plan_ptr, x.data_ptr(), rows, _scratch(self.lut_numel), y.data_ptr(), torch.get_num_threads())
        return y


def _decode_call(module, codes: torch.Tensor, cbT: torch.Tensor, s: torch.Tensor) -> _DecodeCall:
    call = module.__dict__.get("_aqlm_decode")
    if call is None or call.key != (codes.data_ptr(), cbT.data_ptr(), s.data_ptr()):
        call = module.__dict__["_aqlm_decode"] = _DecodeCall(codes, cbT, s, module.in_features)
    return call


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
        b = module._buffers
        cbT = b.get("k_cbT")
        # decode in float32 (the common case): straight to the packed call, no reshapes or casts (each
        # costs about a microsecond, and a 576-wide layer's whole call is about thirty)
        if (cbT is not None and x.dtype is torch.float32 and module.act_quant is None and module.bias is None
                and x.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled())):
            rows = x.numel() // module.in_features
            if rows < DEQUANT_MIN_M:
                return _decode_call(module, b["k_codes"], cbT, b["k_s"])(x, rows)
        x, x2, xf = layer_rows(module, x, torch.float32)
        cb, s, codes = b["k_cb"], b["k_s"], b["k_codes"]
        if x2.shape[0] < DEQUANT_MIN_M and not (xf.requires_grad and torch.is_grad_enabled()):
            if cbT is not None:
                xf = xf if xf.is_contiguous() else xf.contiguous()
                y = _decode_call(module, codes, cbT, s)(xf, xf.shape[0])
            else:
                y = aqlm_gather_mm(xf, codes, cb, s)
        else:
            y = F.linear(xf, module.quantized_weight.dequantize(torch.float32))
        return layer_output(module, y, x)


register_kernel(CpuAqlmKernel)
