"""The reference kernel: dequantize to the activation dtype, then a plain matmul.

It runs every layout on every device and is the ground truth the fast kernels are tested
against (their results must agree within stated tolerances)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyquant.kernels.base import Kernel, register_kernel

__all__ = ["ReferenceKernel"]


class ReferenceKernel(Kernel):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "hip")
    priority = 0
    layouts = "every layout (dequantize + matmul)"
    fast = False
    layout_kinds = ("scalar", "ternary", "vector")
    sparse_outliers = True

    def supports(self, qw, device):
        return None

    def forward(self, module, x):
        w = module.quantized_weight.dequantize(x.dtype)
        if module.act_quant is not None:
            x = module.act_quant(x)
        bias = module.bias
        return F.linear(x, w, bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias)


register_kernel(ReferenceKernel)
