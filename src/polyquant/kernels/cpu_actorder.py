"""``cpu-int4-actorder``: 4-bit act-order (``g_idx``) weights through the packed CPU int4 op.

ExLlama's trick: sort the input columns by ``g_idx`` once at prepare time, so each group's
columns become contiguous and the weight is an ordinary group-wise weight; at run time the
input is gathered in the same order (``x[..., perm]``), which leaves ``x @ W.T`` unchanged.
This needs the sorted ``g_idx`` to be ``i // group_size`` (true of every GPTQ act-order
checkpoint: each group holds exactly ``group_size`` columns); the rest is ``cpu-int4``.
"""
from __future__ import annotations

import torch

from polyquant.kernels.base import Kernel, layer_output, register_kernel
from polyquant.kernels.cpu import CpuInt4Kernel

_BF16 = torch.bfloat16
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["CpuInt4ActOrderKernel", "gather_columns", "group_perm", "sort_by_group"]


def group_perm(qw: QuantizedWeight) -> torch.Tensor | str:
    """The column order that makes ``qw``'s act-order groups contiguous runs of ``group_size``
    (a stable sort of ``g_idx``), or the reason there is none."""
    if qw.g_idx is None:
        return "no g_idx"
    g = qw.g_idx.long()
    perm = torch.argsort(g, stable=True)
    gs = qw.group_columns
    if not torch.equal(g[perm], torch.arange(qw.shape[1], device=g.device) // gs):
        return f"g_idx groups are not runs of group_size {gs} once sorted"
    return perm


def sort_by_group(qw: QuantizedWeight) -> tuple[QuantizedWeight, torch.Tensor] | str:
    """``(qw with columns sorted by g_idx and g_idx dropped, perm)`` such that
    ``x @ qw.dequantize().T == x[..., perm] @ sorted.dequantize().T``; or the reason it cannot."""
    perm = group_perm(qw)
    if isinstance(perm, str):
        return perm
    codes = qw.codes[:, perm]
    sorted_qw = QuantizedWeight.from_codes(codes, qw.qtype, qw.block, qw.scale, qw.zero, None, qw.extras)
    return sorted_qw, perm


def gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[..., perm]`` as ``[rows, n]``. At decode this runs for every act-order layer, and the cost
    depends on the form (torch 2.13, 1 thread, n = 1536, inference mode): ``x[..., perm]`` /
    ``index_select(-1)`` on ``[1, 1, n]`` 4.1-4.4 us, on the flat vector 1.4 us, on ``[m, n]`` along
    dim 1 1.9 us."""
    n = x.shape[-1]
    if x.numel() == n:  # one row (decode)
        return x.reshape(n).index_select(0, perm).view(1, n)
    return x.reshape(-1, n).index_select(1, perm)


class CpuInt4ActOrderKernel(Kernel):
    name = "cpu-int4-actorder"
    devices = ("cpu",)
    priority = 19
    layouts = "4-bit act-order (g_idx) weights: columns sorted by group once, input gathered per call; bf16"

    _int4 = CpuInt4Kernel()

    def check(self, qw, device):
        if qw.g_idx is None:
            return "needs act-order g_idx (cpu-int4 takes the layer without one)"
        if qw.qt.kind != "int" or qw.bits != 4:
            return f"needs 4-bit integer weights, got {qw.qtype}"
        perm = group_perm(qw)
        if isinstance(perm, str):
            return perm
        # the column order does not matter to cpu-int4's shape/group checks
        plain = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, None, qw.extras)
        return self._int4.supports(plain, device)

    def prepare(self, qw):
        sorted_qw, perm = sort_by_group(qw)
        buf = self._int4.prepare(sorted_qw)
        buf["perm"] = perm
        return buf

    def forward(self, module, x):
        # cpu-int4's forward with the gather in front, inlined (120-210 calls per token at decode)
        if module.act_quant is not None:
            x = module.act_quant(x)  # before the gather: a quantizer sees the columns in their own order
        b = module._buffers
        dtype = x.dtype
        n = x.shape[-1]
        xg = gather_columns(x, b["k_perm"])
        xb = xg if dtype == _BF16 else xg.to(_BF16)
        sz = b["k_sz"]
        return layer_output(module, _int4_mm(xb, b["k_w"], n // sz.shape[0], sz), x)


register_kernel(CpuInt4ActOrderKernel)
