"""optimum-quanto's static qint8 activations x int8 weights (``quanto-int8``). The rule and its
calibration are :mod:`polyquant.activations.quanto` (re-exported here) and
:mod:`polyquant.calibration.activations`."""
from __future__ import annotations

import torch

from polyquant.activations.quanto import ACT_QTYPES, QuantoActivation
from polyquant.kernels.base import Kernel, register_kernel

__all__ = ["QuantoActivation", "QuantoInt8Kernel", "ACT_QTYPES"]


class QuantoInt8Kernel(Kernel):
    """int8 weights x optimum-quanto's static qint8 activations as quanto runs them on CPU
    (``qbytes_int_mm``): ``torch._int_mm`` of the int8 codes (exact int32 sums), then
    ``acc.float() * (s_x * s_w)``, cast to the output dtype, plus bias. Layers whose rule is qfloat8
    take the ``cpu-int8`` path on the fake-quantized input."""

    name = "quanto-int8"
    devices = ("cpu",)
    priority = 25
    layouts = "8-bit symmetric per-channel weights with quanto's static qint8 activations (int8 x int8)"
    act_rules = ({"kind": QuantoActivation.kind},)

    def check(self, qw, device):
        from polyquant.kernels.int8_dynamic import symmetric_int8_reason
        return symmetric_int8_reason(qw, ((1, qw.shape[1]),))

    def prepare(self, qw):
        from polyquant.kernels.int8_dynamic import int8_codes
        s = qw.scale[:, 0].float().contiguous()
        return {"w": int8_codes(qw), "s": s.to(torch.bfloat16), "sf": s}  # w, s: the cpu-int8 buffers (qfloat8 path)

    def forward(self, module, x):
        rule = module.act_quant
        if getattr(rule, "kind", None) != QuantoActivation.kind or rule.qtype != "qint8":
            from polyquant.kernels.cpu import CpuInt8Kernel
            return CpuInt8Kernel.forward(self, module, x)
        from polyquant.kernels.int8_dynamic import int8_mm
        b = module._buffers
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        q, xs = rule.quantize(x2)
        scales = xs * b["k_sf"]  # quanto: input._scale * weight._scale
        y = (int8_mm(q, b["k_w"]).to(torch.float32) * scales).to(scales.dtype).to(dtype)
        if module.bias is not None:
            y = y + module.bias.to(dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


register_kernel(QuantoInt8Kernel)
