"""``cpu-spqr``: SpQR layers (2- to 4-bit integer codes in groups of 16 inputs, float scale and zero
per group - the decoded two-level statistics - and a CSR matrix of float outliers) on the CPU.

A compiled C function (``kernels/csrc/spqr.c``, built once by :mod:`polyquant.kernels.cext`):
per group of 16 the table ``(t - z) * s`` in one AVX-512 register and one permute looks up the 16
codes (AVX2 + FMA: the codes widened to floats, ``(q - z) * s``; other CPUs: portable C, see
``simd_level``), float32 activations and accumulation, then the sparse outliers as a CSR product
per output row. The weight value is exactly the reference's ``(code - zero) * scale`` (+ outlier)
in float32; only the summation order differs.

Layout (``prepare``): input columns in processing order (act-order: ``extras['in_perm']``, or the
columns sorted by ``g_idx``), zero-padded to a multiple of 16; codes as bytes ``[N, Kp/2]`` (two
4-bit codes per byte, low nibble first); scale and code-domain zero float32 ``[N, Kp/16]``;
outliers' row offsets int32, columns int32 (processing order), values float32. The input is
gathered (and padded) per call. Up to ``DEQUANT_MIN_M - 1`` activation rows run in the C loop;
longer inputs (prefill) dequantize the weight with the same code and call PyTorch's matmul.

Only layers that carry sparse outliers (SpQR's) are taken; other group-16 layouts are left to the
kernels that already run them. What remains: codes are stored at 4 bits for every width (3-bit
weights take 4/3 of their packed size at run time), no int8 activation path, no AMX.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, layer_output, register_kernel
from polyquant.kernels.cext import CLibrary, I64, PTR, library_error
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuSpQRKernel", "simd_level", "simd_levels", "spqr_mm", "spqr_dequantize", "DEQUANT_MIN_M", "GROUP"]

DEQUANT_MIN_M = 16
GROUP = 16
_LIB = "spqr"


_C = CLibrary(_LIB, {
    "pq_spqr_mm": ([I64, I64, I64, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64], None),
    "pq_spqr_dequant": ([I64, I64, PTR, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64], None),
})
_lib = _C.lib  # the library with its signatures declared (RuntimeError when it cannot build)
simd_levels = _C.simd_levels  # every code path this CPU can run (tests cover each)


def simd_level() -> int:
    """The code path this CPU runs: 1 AVX-512F, 2 AVX2 + FMA, 0 portable C."""
    return _C.simd_level()


def _order(qw: QuantizedWeight) -> torch.Tensor | None | str:
    """Processing order of the input columns (groups contiguous), None for the identity, or why not."""
    k = qw.shape[1]
    p = qw.extras.get("in_perm")
    if p is not None:
        perm = p.long() & 0xFFFF if p.dtype == torch.int16 else p.long()
        if perm.numel() != k:
            return f"in_perm has {perm.numel()} entries for {k} inputs"
    elif qw.g_idx is not None:
        perm = torch.argsort(qw.g_idx.long(), stable=True)
    else:
        return None
    want = torch.arange(k, device=perm.device) // GROUP
    if not torch.equal(qw.g_idx.long()[perm], want):
        return "g_idx does not place whole groups of 16 consecutive inputs in processing order"
    return perm


def _ptr_of(t: torch.Tensor) -> int:
    return t.data_ptr()


def spqr_mm(xp: torch.Tensor, b: dict[str, torch.Tensor], simd: int | None = None, threads: int | None = None
            ) -> torch.Tensor:
    """``xp [M, Kp]`` float32 (processing order, zero-padded) times the prepared weight ``b`` -> ``[M, N]``."""
    m, kp = xp.shape
    n = b["w"].shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    xs = xp.view(m, kp // GROUP, GROUP).sum(-1)
    _lib().pq_spqr_mm(m, n, kp, xp.data_ptr(), b["w"].data_ptr(), b["s"].data_ptr(), b["z"].data_ptr(),
                      b["mz"].data_ptr(), xs.data_ptr(), b["ro"].data_ptr(), _ptr_of(b["col"]), _ptr_of(b["val"]), y.data_ptr(), n,
                      threads or torch.get_num_threads(), _C.level(simd))
    return y


def spqr_dequantize(b: dict[str, torch.Tensor], simd: int | None = None, threads: int | None = None) -> torch.Tensor:
    """The float32 weight ``[N, Kp]`` in processing order, outliers added."""
    n, kp = b["w"].shape[0], b["w"].shape[1] * 2
    out = torch.empty(n, kp, dtype=torch.float32)
    _lib().pq_spqr_dequant(n, kp, b["w"].data_ptr(), b["s"].data_ptr(), b["z"].data_ptr(), b["ro"].data_ptr(),
                           _ptr_of(b["col"]), _ptr_of(b["val"]), out.data_ptr(), threads or torch.get_num_threads(),
                           _C.level(simd))
    return out


def prepare_spqr(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The kernel's buffers (see the module docstring)."""
    qw = qw.to("cpu")
    n, k = qw.shape
    perm = _order(qw)
    if isinstance(perm, str):
        raise ValueError(perm)
    g = -(-k // GROUP)
    kp = g * GROUP
    codes = qw.codes if perm is None else qw.codes[:, perm]
    c = torch.zeros(n, kp, dtype=torch.uint8)
    c[:, :k] = codes
    c = c.view(n, kp // 2, 2)
    w = (c[..., 0] | (c[..., 1] << 4)).contiguous()
    s = qw.scale.to(torch.float32).reshape(n, -1)[:, :g].contiguous()
    z = qw.zero_points().reshape(n, -1)[:, :g].contiguous()
    o = qw.outliers
    if o is None:
        ro, col, val = torch.zeros(n + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    else:
        cols = o.cols.long()
        if perm is not None:
            cols = torch.argsort(perm)[cols]
        ro, col, val = o.row_offsets.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous(), \
            o.values.to(torch.float32).contiguous()
    buf = {"w": w, "s": s, "z": z, "mz": (-(s * z)).contiguous(), "ro": ro, "col": col, "val": val}
    if perm is not None:
        buf["perm"] = perm.contiguous()
    return buf


class CpuSpQRKernel(Kernel):
    """SpQR layers: dense 2- to 4-bit groups of 16 with float scale / zero, then the CSR outliers."""

    name = "cpu-spqr"
    devices = ("cpu",)
    priority = 24
    layouts = ("SpQR: 2- to 4-bit integer codes in groups of 16 inputs (act-order too) with sparse outliers; "
               "compiled C (AVX-512 / AVX2 / portable); float32")
    sparse_outliers = True
    layout_kinds = ("scalar",)

    def check(self, qw, device):
        if qw.outliers is None:
            return "runs SpQR layers (with sparse outliers); dense group-16 layouts are left to the integer kernels"
        if qw.qt.kind != "int" or not 2 <= qw.bits <= 4:
            return f"needs 2- to 4-bit integer codes, got {qw.qtype}"
        if qw.block != (1, GROUP):
            return f"needs groups of 16 inputs (block (1, 16)), got block {qw.block}"
        perm = _order(qw)
        if isinstance(perm, str):
            return perm
        if r := library_error(_LIB):
            return r
        return None

    def prepare(self, qw):
        return prepare_spqr(qw)

    def forward(self, module, x):
        if module.act_quant is not None:
            x = module.act_quant(x)
        bb = module._buffers
        b = {k: bb[f"k_{k}"] for k in ("w", "s", "z", "mz", "ro", "col", "val")}
        perm = bb.get("k_perm")
        k = module.in_features
        x2 = x.reshape(-1, x.shape[-1])
        kp = b["w"].shape[1] * 2
        xp = torch.zeros(x2.shape[0], kp, dtype=torch.float32)
        xp[:, :k] = x2 if perm is None else x2[:, perm]
        if x2.shape[0] < DEQUANT_MIN_M and not (x.requires_grad and torch.is_grad_enabled()):
            y = spqr_mm(xp, b)
        else:
            y = F.linear(xp, spqr_dequantize(b))
        return layer_output(module, y, x)


register_kernel(CpuSpQRKernel)
