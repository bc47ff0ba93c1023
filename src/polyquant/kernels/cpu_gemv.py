"""``cpu-gemv``: batch-1 matrix-vector products at the memory limit on AVX2 + FMA CPUs, float32 numerics.

For integer weights of 1-4 bits and of 8 bits with one scale (and optional zero point) per group of a
multiple of 32 inputs (or whole rows), sym or asym. A compiled C function (``kernels/csrc/gemv.c``,
built once by :mod:`polyquant.kernels.cext`) reads a "lanes" layout in which each 32-bit word holds the
codes of one AVX2 lane (4-bit: word ``i`` of each block of 64 inputs holds input ``64 b + 8 j + i`` in
nibble ``j``; 8-bit: blocks of 32, byte ``j``), so the codes widen to float lanes with a mask and a
convert, no shuffle; the activation is pre-scaled by the nibble's power of two (exact), each group's
``(offset + zero) * sum x`` and scale are applied once per group. Float32 activations and accumulation
(no bf16 rounding of the input, unlike ``cpu-int4`` / ``cpu-int8``). Up to ``DEQUANT_MIN_M - 1`` rows run
the matrix-vector loop; more rows dequantize (bit-exact with :meth:`QuantizedWeight.dequantize`) and
call PyTorch's matmul.

The C file also holds one whole Llama-family decoder layer step built from these products (RMSNorm,
q/k/v, rope, the KV cache write, attention, o, gate/up, SiLU, down), which
:class:`polyquant.nn.decode.FastDecoder` runs per token (:class:`GemvLinear`, :class:`Layer`, :class:`Model`).

``auto`` never picks this kernel (priority below ``reference``): request it by name
(``kernel="cpu-gemv"``); the fast decode runtime uses it for its own copies of the layers.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, layer_output, layer_rows, register_kernel
from polyquant.kernels.cext import CLibrary, I64, PTR, library_error
from polyquant.kernels.cpu_lut4 import _group, lut4_scales
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuGemvKernel", "simd_level", "simd_levels", "pack_lanes", "gemv", "q_dequantize", "DEQUANT_MIN_M",
           "tile_rows", "GemvLinear", "Layer", "Model", "linear_desc", "lib", "F32", "BF16", "Q4", "Q8"]

DEQUANT_MIN_M = 16
_LIB = "gemv"
_i64, _ptr, _f32, _i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int32
F32, BF16, Q4, Q8 = 0, 1, 2, 3


class GemvLinear(ctypes.Structure):
    """``pq_linear`` of gemv.c: one layer's weight as the C code reads it."""
    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("g", _i64), ("w", _ptr), ("s", _ptr), ("z", _ptr),
                ("off", _f32), ("bf16_io", _i32), ("bias", _ptr)]


class Layer(ctypes.Structure):
    """``pq_layer``: one decoder layer (norm weights, the four projections, its KV cache)."""
    _fields_ = [("ln1", _ptr), ("ln2", _ptr), ("eps1", _f32), ("eps2", _f32), ("qkv", GemvLinear),
                ("o", GemvLinear), ("gu", GemvLinear), ("down", GemvLinear), ("kc", _ptr), ("vc", _ptr)]


class Model(ctypes.Structure):
    """``pq_model``: shapes, rotary tables and scratch shared by every layer."""
    _fields_ = [("hidden", _i64), ("n_heads", _i64), ("n_kv", _i64), ("head_dim", _i64), ("max_len", _i64),
                ("inter", _i64), ("scaling", _f32), ("cos", _ptr), ("sin", _ptr), ("buf", _ptr)]


_C = CLibrary(_LIB, {
    "pq_gemv": ([ctypes.POINTER(GemvLinear), I64, PTR, I64, PTR, I64, I64, I64], None),
    "pq_q_dequant": ([I64, I64, I64, I64, PTR, PTR, PTR, _f32, PTR, I64], None),
    "pq_decode_scratch": ([I64] * 7, I64),
    "pq_decode_layer": ([ctypes.POINTER(Model), ctypes.POINTER(Layer), PTR, I64, I64, I64], I64),
    "pq_decode_head": ([ctypes.POINTER(Model), PTR, _f32, ctypes.POINTER(GemvLinear), PTR, PTR, I64, I64], None),
})
lib = _C.lib  # the compiled library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 2 AVX2 + FMA, 0 the portable C loop."""
    return _C.simd_level()


def _bits(qw: QuantizedWeight) -> int:
    return 4 if qw.bits <= 4 else 8


def pack_lanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` (unsigned, < 2**bits) -> the lanes layout as int32 words ``[ceil(N/4), K * bits / 8]``:
    rows in tiles of 4 (zero rows pad the last), per tile ``[blocks][4 rows][8 words]``, word ``i`` of a
    block holding input ``8 j + i`` of the block in bit field ``j`` (see the module docstring; ``K`` a
    multiple of 64 for 4 bits, 32 for 8 bits)."""
    n, k = codes.shape
    per = 32 // bits
    n4 = -(-n // 4) * 4
    c = codes.to(torch.int64)
    if n4 != n:
        c = torch.cat([c, c.new_zeros(n4 - n, k)])
    c = c.reshape(n4 // 4, 4, k // (8 * per), per, 8)  # [tile, row, block, position j, lane i]
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, 1, 1, per, 1)
    words = (c << shifts).sum(dim=3)  # [tile, row, block, 8], < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.permute(0, 2, 1, 3).reshape(n4 // 4, -1).contiguous()


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row ``[N, G]`` float32 (scales, zero points) -> ``[ceil(N/4), G, 4]`` (zeros pad the last tile)."""
    n, g = t.shape
    n4 = -(-n // 4) * 4
    if n4 != n:
        t = torch.cat([t, t.new_zeros(n4 - n, g)])
    return t.reshape(n4 // 4, 4, g).permute(0, 2, 1).contiguous()


def _ptr_of(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(desc: GemvLinear, x: torch.Tensor, simd: int | None = None, threads: int | None = None) -> torch.Tensor:
    """``x [M, K] float32`` through one layer's descriptor -> ``[M, N]`` float32 (row by row)."""
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, desc.n, dtype=torch.float32)
    lib().pq_gemv(ctypes.byref(desc), m, x.data_ptr(), desc.k, y.data_ptr(), desc.n,
                  threads or torch.get_num_threads(), _C.level(simd))
    return y


def q_dequantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, off: float, n: int, k: int, bits: int,
                 threads: int | None = None) -> torch.Tensor:
    """The dense float32 weight ``[N, K]`` of the lanes layout (``((code - off) - z) * s``, bit-exact)."""
    n = int(n)
    out = torch.empty(n, k, dtype=torch.float32)
    lib().pq_q_dequant(bits, n, k, k // s.shape[1], w.data_ptr(), s.data_ptr(), _ptr_of(z), float(off),
                       out.data_ptr(), threads or torch.get_num_threads())
    return out


def _desc_from_buffers(b: dict, bias: torch.Tensor | None) -> GemvLinear:
    w, s, z = b["k_w"], b["k_s"], b.get("k_z")
    n, k, bits, off = (int(v) for v in b["k_meta"])
    kind = Q4 if bits == 4 else Q8
    return GemvLinear(kind, n, k, k // s.shape[1], w.data_ptr(), s.data_ptr(), _ptr_of(z),
                      float(off), 0, _ptr_of(bias))


def linear_desc(module, keep: list) -> tuple[GemvLinear | None, str | None]:
    """The C descriptor of a float ``nn.Linear`` (float32 weight), a bf16 head computing in bf16
    (``FloatHead``: input and output rounded to bf16 as ``torch.mv`` does) or a ``QuantLinear`` running
    ``cpu-gemv``; ``(None, reason)`` otherwise. Tensors the descriptor points to are appended to
    ``keep`` (the caller holds them)."""
    from torch import nn
    if getattr(module, "kernel_name", None) == "cpu-gemv":
        if module.act_quant is not None:
            return None, "activation quantization"
        b = module._buffers
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        keep.extend(t for t in (b["k_w"], b["k_s"], b.get("k_z"), bias) if t is not None)
        return _desc_from_buffers(b, bias), None
    if isinstance(module, nn.Linear) and type(module).__name__ in ("Linear", "FloatHead"):
        w = module.weight.detach()
        out_dtype = getattr(module, "out_dtype", w.dtype)
        if w.dtype == torch.float32 and out_dtype == torch.float32:
            kind, io = F32, 0
        elif w.dtype == torch.bfloat16 and out_dtype == torch.float32 and type(module).__name__ == "FloatHead":
            kind, io = BF16, 1
        else:
            return None, f"a {w.dtype} Linear with {out_dtype} output"
        w = w.contiguous()
        bias = None
        if module.bias is not None:
            bias = module.bias.detach().float().contiguous()
        keep.extend(t for t in (w, bias) if t is not None)
        n, k = w.shape
        return GemvLinear(kind, n, k, k, w.data_ptr(), None, None, 0.0, io, _ptr_of(bias)), None
    return None, f"{type(module).__name__} (kernel {getattr(module, 'kernel_name', 'none')}) has no C matrix-vector path"


class CpuGemvKernel(Kernel):
    """1- to 4-bit and 8-bit integer weights, group-wise or per-channel, sym or asym; float32."""

    name = "cpu-gemv"
    devices = ("cpu",)
    priority = -1  # explicit only (kernel="cpu-gemv"; the fast decode runtime's choice): auto keeps its kernels
    layouts = ("1- to 4-bit and 8-bit integer weights, one scale (+ zero) per group of a multiple of 32 inputs or "
               "whole rows, in_features % 64 (4-bit) / 32 (8-bit); compiled C (AVX2 + FMA / portable); float32; "
               "explicit request only")

    def check(self, qw, device):
        if qw.qt.kind != "int" or not (qw.bits <= 4 or qw.bits == 8):
            return f"needs 1- to 4-bit or 8-bit integer weights, got {qw.qtype}"
        if qw.g_idx is not None or qw.extras:
            return "act-order (g_idx) / extras not supported"
        g = _group(qw)
        if isinstance(g, str):
            return g
        blk = 64 if qw.bits <= 4 else 32
        if qw.shape[1] % blk:
            return f"in_features {qw.shape[1]} is not a multiple of {blk}"
        if r := library_error(_LIB):
            return r
        return None

    def prepare(self, qw):
        g = _group(qw)
        bits = _bits(qw)
        buf = {"w": pack_lanes(qw.codes, bits), "s": tile_rows(lut4_scales(qw, g)),
               "meta": torch.tensor([qw.shape[0], qw.shape[1], bits, qw.qt.code_offset], dtype=torch.int64)}
        if qw.zero is not None:
            buf["z"] = tile_rows(lut4_scales(qw, g, qw.zero))
        return buf

    def forward(self, module, x):
        x, x2, xf = layer_rows(module, x, torch.float32)
        b = module._buffers
        if x2.shape[0] < DEQUANT_MIN_M and not (xf.requires_grad and torch.is_grad_enabled()):
            cache = module.__dict__.get("_pq_gemv")
            if cache is None or cache[1] != b["k_w"].data_ptr():
                cache = (_desc_from_buffers(b, None), b["k_w"].data_ptr())
                module.__dict__["_pq_gemv"] = cache
            y = gemv(cache[0], xf)
        else:
            n, k, bits, off = (int(v) for v in b["k_meta"])
            w = q_dequantize(b["k_w"], b["k_s"], b.get("k_z"), off, n, k, bits)
            y = F.linear(xf, w)
        return layer_output(module, y, x)


register_kernel(CpuGemvKernel)
