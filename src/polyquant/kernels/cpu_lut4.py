"""``cpu-lut4``: 4-bit code-book weights (bitsandbytes NF4 / FP4, any 16-entry table) on the CPU.

PyTorch has no packed op for non-uniform 4-bit codes, so this kernel is a small compiled C function
(``kernels/csrc/lut4.c``, built once by :mod:`polyquant.kernels.cext`): the 16-entry table, scaled
by each group's absmax, sits in one AVX-512 register and one permute looks up 16 codes at once;
float32 activations and accumulation (bitsandbytes' CPU path casts both to bf16). Up to
``DEQUANT_MIN_M - 1`` activation rows (decode, small batches) run in that loop; longer inputs
(prefill) dequantize the weight to float32 with the same code and call PyTorch's matmul.

Layout (``pack_lut4``): codes ``[N, K]`` -> bytes ``[N, K/2]``, each run of 32 codes ``c[0..31]`` as
16 bytes ``c[b] | c[16 + b] << 4``; scales ``[N, K/G]`` float32 with ``G`` (inputs per scale) a
multiple of 32 dividing ``K``, or whole rows.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.cext import library_error, load_library
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuLut4Kernel", "has_avx512", "pack_lut4", "lut4_scales", "lut4_mm", "lut4_dequantize", "DEQUANT_MIN_M"]

DEQUANT_MIN_M = 16  # activation rows from which the weight is dequantized and PyTorch's matmul runs
_LIB = "lut4"
_SIMD: dict[str, int] = {}
_FN: dict[str, ctypes._CFuncPtr] = {}
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _lib() -> ctypes.CDLL:
    lib = load_library(_LIB)
    if "argtypes" not in _SIMD:
        lib.pq_lut4_mm.argtypes = [_i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]
        lib.pq_lut4_mm.restype = None
        lib.pq_lut4_dequant.argtypes = [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64]
        lib.pq_lut4_dequant.restype = None
        _SIMD["avx512"] = int(lib.pq_lut4_has_avx512())
        _SIMD["argtypes"] = True
        _FN["mm"] = lib.pq_lut4_mm
    return lib


def has_avx512() -> bool:
    _lib()
    return bool(_SIMD["avx512"])


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


def lut4_scales(qw: QuantizedWeight, g: int) -> torch.Tensor:
    """The per-group scales ``[N, K/g]`` float32 of ``qw``'s layout."""
    n, k = qw.shape
    r, c = qw.block
    s = qw.scale.to(torch.float32)
    if c >= k:
        s = s.reshape(-1)[: -(-n // r)].repeat_interleave(r)[:n].reshape(n, 1)
    else:
        s = s.reshape(n, -1)[:, : k // g]
    return s.contiguous()


def lut4_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, lut: torch.Tensor, simd: bool | None = None,
            threads: int | None = None) -> torch.Tensor:
    """``x [M, K] float32 @ W.T`` with ``W[n, k] = lut[code] * s[n, k // G]`` -> ``[M, N]`` float32."""
    mm = _FN.get("mm") or _lib().pq_lut4_mm
    m, k = x.shape
    n = w.shape[0]
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    mm(m, n, k, k // s.shape[1], x.data_ptr(), k, w.data_ptr(), s.data_ptr(), lut.data_ptr(), y.data_ptr(), n,
       threads or torch.get_num_threads(), _SIMD["avx512"] if simd is None else int(simd))
    return y


def lut4_dequantize(w: torch.Tensor, s: torch.Tensor, lut: torch.Tensor, simd: bool | None = None,
                    threads: int | None = None) -> torch.Tensor:
    """The dense float32 weight ``[N, K]`` of the packed layout."""
    lib = _lib()
    n, k = w.shape[0], w.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.float32)
    lib.pq_lut4_dequant(n, k, k // s.shape[1], w.data_ptr(), s.data_ptr(), lut.data_ptr(), out.data_ptr(),
                        threads or torch.get_num_threads(), int(_SIMD["avx512"] if simd is None else simd))
    return out


class CpuLut4Kernel(Kernel):
    name = "cpu-lut4"
    devices = ("cpu",)
    priority = 20
    layouts = ("4-bit code-book weights (NF4, FP4) with one scale per group of a multiple of 32 inputs "
               "(or whole rows); compiled C, AVX-512 when the CPU has it; float32 accumulation")

    def supports(self, qw, device):
        if r := self._device_reason(device):
            return r
        if qw.qt.kind != "codebook" or qw.bits != 4 or len(qw.qt.values or ()) != 16:
            return f"needs a 16-entry 4-bit code book (nf4, fp4), got {qw.qtype}"
        if qw.zero is not None or qw.g_idx is not None or "outliers" in qw.extras:
            return "zero points, act-order (g_idx) and outliers are not supported"
        g = _group(qw)
        if isinstance(g, str):
            return g
        if r := library_error(_LIB):
            return r
        return None

    def prepare(self, qw):
        g = _group(qw)
        lut = qw.qt.decode(torch.arange(16, dtype=torch.uint8)).to(torch.float32).contiguous()
        return {"w": pack_lut4(qw.codes), "s": lut4_scales(qw, g), "lut": lut}

    def forward(self, module, x):
        if module.act_quant is not None:
            x = module.act_quant(x)
        b = module._buffers
        w, s, lut = b["k_w"], b["k_s"], b["k_lut"]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xf = x2 if dtype == torch.float32 else x2.to(torch.float32)
        if x2.shape[0] < DEQUANT_MIN_M:
            y = lut4_mm(xf, w, s, lut)
        else:
            y = F.linear(xf, lut4_dequantize(w, s, lut))
        if dtype != torch.float32:
            y = y.to(dtype)
        if module.bias is not None:
            y = y + module.bias.to(dtype)
        return y.view(*x.shape[:-1], y.shape[-1]) if x.dim() != 2 else y


register_kernel(CpuLut4Kernel)
