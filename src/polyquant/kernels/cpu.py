"""CPU fast paths through PyTorch's packed weight ops.

- ``cpu-int8``: ``aten._weight_int8pack_mm`` for 8-bit per-channel weights (symmetric; an
  asymmetric zero becomes a per-row correction ``x.sum() * (128 - z) * s``). From 16 rows on
  (prefill, evaluation) the int8 codes, exact in bf16, go through a bf16 matmul instead and are
  scaled after: the same sum, 5-10x faster than the int8-weight op at M = 512.
- ``cpu-int4``: ``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``
  for 4-bit group-wise weights (groups 32/64/128/256 dividing the input features, out % 16 == 0;
  per-channel and larger groups ride on the largest such group with repeated scales). The op
  dequantizes ``(q - 8) * s + z'``, so our ``(q - z) * s`` maps to ``z' = (8 - z) * s``. 1- to
  3-bit codes (HQQ 3-bit, quanto int2, RTN 2/3-bit) are the same 4-bit codes with the high bits
  clear: they run through this op too (the packed copy is 4 bits per weight; the stored weight
  keeps its own width).

Both ops are fast only with bf16 activations (measured on torch 2.13, AVX-512: 2.2-2.8x an fp32
linear at batch 1 with bf16, 10-25x slower with fp32/fp16), so these kernels cast the input to
bf16 and the output back to the caller's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, layer_output, layer_rows, register_kernel

__all__ = ["CpuInt4Kernel", "CpuInt8Kernel"]

_INT4_GROUPS = (256, 128, 64, 32)
_BF16 = torch.bfloat16
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_int8_mm = torch.ops.aten._weight_int8pack_mm.default
#: rows from which cpu-int8 multiplies the int8 codes as bf16 instead (measured crossover ~8-16)
_INT8_PREFILL_M = 16


class CpuInt8Kernel(Kernel):
    name = "cpu-int8"
    devices = ("cpu",)
    priority = 20
    layouts = "8-bit per-channel weights (sym or asym), bf16 activations"

    def check(self, qw, device):
        if qw.qt.kind != "int" or qw.bits != 8:
            return f"needs 8-bit integer weights, got {qw.qtype}"
        if qw.block != (1, qw.shape[1]):
            return f"needs per-channel scales, got block {qw.block}"
        if qw.g_idx is not None or qw.extras:
            return "act-order / extras not supported"
        return None

    def prepare(self, qw):
        # (code - offset - zero) * s == (code - 128) * s + (128 - offset - zero) * s
        from polyquant.kernels.int8_dynamic import int8_codes
        signed = int8_codes(qw)  # code - 128, as int8
        s = qw.scale[:, 0].float()
        buf = {"w": signed, "s": s.to(torch.bfloat16)}
        zero = qw.zero[:, 0].float() if qw.zero is not None else torch.zeros_like(s)
        c = (128.0 - qw.qt.code_offset - zero) * s
        if bool((c != 0).any()):
            buf["c"] = c
        return buf

    def forward(self, module, x):
        # Hot path at decode (hundreds of calls per token): read buffers straight from
        # ``_buffers``, skip casts that are not needed, call the op overload directly.
        x, x2, xb = layer_rows(module, x, _BF16)
        b = module._buffers
        dtype = x.dtype
        if xb.shape[0] >= _INT8_PREFILL_M:
            # many rows (prefill, evaluation, calibration): the int8 codes are exact in bf16, so a
            # bf16 matmul (oneDNN / AMX) against them, scaled after, is the same sum - and 5-10x
            # faster than the int8-weight op at M = 512 (12 ms -> 1.4 ms for 576 -> 1536 here)
            y = (F.linear(xb, b["k_w"].to(_BF16)).to(torch.float32) * b["k_s"].to(torch.float32)).to(dtype)
        else:
            y = _int8_mm(xb, b["k_w"], b["k_s"])
            if dtype != _BF16:
                y = y.to(dtype)
        c = b.get("k_c")
        if c is not None:
            y = y + x2.sum(-1, keepdim=True).to(dtype) * c.to(dtype)
        return layer_output(module, y, x)


class CpuInt4Kernel(Kernel):
    name = "cpu-int4"
    devices = ("cpu",)
    priority = 20
    layouts = ("1- to 4-bit group-wise integer weights (group 32/64/128/256 dividing in_features; "
               "out % 16 == 0), bf16 activations")

    @staticmethod
    def _op_group(qw) -> int | None:
        out, inp = qw.shape
        c = qw.block[1]
        for g in _INT4_GROUPS:
            if inp % g == 0 and (c % g == 0 or c >= inp):
                return g
        return None

    def check(self, qw, device):
        if qw.qt.kind != "int" or qw.bits > 4:
            return f"needs 1- to 4-bit integer weights, got {qw.qtype}"
        if qw.block[0] != 1:
            return f"needs row blocks of 1, got block {qw.block}"
        if qw.g_idx is not None or qw.extras:
            return "act-order (g_idx) / extras not supported"
        if qw.shape[0] % 16:
            return f"out_features {qw.shape[0]} is not a multiple of 16"
        if self._op_group(qw) is None:
            return f"group {qw.block[1]} / in_features {qw.shape[1]} do not fit groups {_INT4_GROUPS}"
        return None

    @staticmethod
    def _per_op_group(t: torch.Tensor, qw, g: int) -> torch.Tensor:
        """Per-block ``[out, ceil(in/c)]`` -> one column per op group of ``g`` inputs ``[out, in/g]``
        (``full_scale()[:, ::g]`` without expanding to the whole weight)."""
        c, inp = qw.block[1], qw.shape[1]
        if c >= inp:
            return t[:, :1].expand(t.shape[0], inp // g)
        return (t.repeat_interleave(c // g, dim=1) if c != g else t)[:, : inp // g]

    def prepare(self, qw):
        g = self._op_group(qw)
        codes = qw.codes.to(torch.int32).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        s = self._per_op_group(qw.scale, qw, g).float()  # [out, in/g]
        # (code - offset - zero) * s == (code - 8) * s + (8 - offset - zero) * s
        zero = self._per_op_group(qw.zero, qw, g).float() if qw.zero is not None else torch.zeros_like(s)
        z = (8.0 - qw.qt.code_offset - zero) * s
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
        return {"w": packed, "sz": sz, "g": torch.tensor(g)}

    def forward(self, module, x):
        x, x2, xb = layer_rows(module, x, _BF16)
        b = module._buffers
        sz = b["k_sz"]
        # group = in_features / number of scale groups (exact: the group divides in_features);
        # avoids reading the ``k_g`` tensor (an ``.item()``) on every call.
        return layer_output(module, _int4_mm(xb, b["k_w"], x2.shape[-1] // sz.shape[0], sz), x)


register_kernel(CpuInt8Kernel)
register_kernel(CpuInt4Kernel)
