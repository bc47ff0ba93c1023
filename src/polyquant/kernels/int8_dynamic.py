"""Dynamic int8 activations x int8 weights (torchao ``Int8DynamicActivationInt8WeightConfig``):
the activation rule and the integer kernel (``int8-dynamic``).

The rule (torchao 0.18 ``Int8Tensor.from_hp`` applied to the activation, ``PerRow`` granularity =
per token, symmetric): in the activation's dtype ``scale = max(|min(x, 0)|, max(x, 0)) / 127.5``,
clamped below at the float32 eps, then cast to float32; ``q = clamp(round(x * (1 / scale)),
-128, 127)`` (round half to even). With ``granularity="tensor"`` one scale covers the whole input.

The kernel computes what torchao's linear does on CPU::

    y = ((q_x @ q_w^T) as int32 -> float32 * scale_x).to(x.dtype) * scale_w + bias

with the integer product from ``torch._int_mm`` (exact int32 accumulation). ``torch._int_mm`` takes
any shape on CPU; on CUDA it needs ``M > 16`` and ``K``, ``N`` multiples of 8, so :func:`int8_mm`
zero-pads there (exact); elsewhere it falls back to float64, exact for ``K < 2**37``.

The reference kernel runs the same rule as fake quantization (``q_x * scale_x`` in float, times the
dequantized weight): equal up to float rounding of the accumulation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyquant.activations.int8 import Int8DynamicActivation, int8_symmetric_scale
from polyquant.kernels.base import Kernel, register_kernel

__all__ = ["Int8DynamicActivation", "Int8DynamicKernel", "int8_mm", "int8_symmetric_scale"]


def symmetric_int8_reason(qw, blocks: tuple[tuple[int, int], ...]) -> str | None:
    """Why ``qw`` is not a signed symmetric 8-bit weight with one of ``blocks`` (None when it is):
    the layout the int8 x int8 kernels take."""
    if qw.qt.kind != "int" or qw.bits != 8 or not qw.qt.signed:
        return f"needs signed 8-bit integer weights, got {qw.qtype}"
    if qw.zero is not None or qw.g_idx is not None or qw.extras:
        return "needs symmetric weights without act-order or extras"
    if qw.block not in blocks:
        return f"needs {'per-channel or per-tensor' if len(blocks) > 1 else 'per-channel'} scales, got block {qw.block}"
    return None


def int8_codes(qw) -> torch.Tensor:
    """The stored offset-binary codes as signed int8 (``code - 128``, a sign-bit flip)."""
    return torch.bitwise_xor(qw.codes.contiguous(), 0x80).view(torch.int8)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] int8 @ b [N, K]^T int8`` -> int32 ``[M, N]``."""
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cpu":
        return torch._int_mm(a.contiguous(), b.t())
    if a.device.type == "cuda":
        pm, pk, pn = max(0, 17 - m), -k % 8, -n % 8
        if pm or pk or pn:
            a = F.pad(a, (0, pk, 0, pm))
            b = F.pad(b, (0, pk, 0, pn))
        return torch._int_mm(a.contiguous(), b.t())[:m, :n]
    return (a.double() @ b.double().t()).round().to(torch.int32)



class Int8DynamicKernel(Kernel):
    name = "int8-dynamic"
    devices = ("cpu", "cuda")
    priority = 25
    layouts = "8-bit symmetric per-channel or per-tensor weights with int8 dynamic activations (int8 x int8)"
    act_rules = ({"kind": Int8DynamicActivation.kind},)

    def check(self, qw, device):
        return symmetric_int8_reason(qw, ((1, qw.shape[1]), tuple(qw.shape)))

    def prepare(self, qw):
        return {"w": int8_codes(qw), "s": qw.scale.float().reshape(-1).contiguous()}

    def forward(self, module, x):
        b = module._buffers
        w, s = b["k_w"], b["k_s"]
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        rule = module.act_quant
        if getattr(rule, "kind", None) != Int8DynamicActivation.kind:  # explicitly requested without the rule
            if rule is not None:
                x2 = rule(x2)
            y = F.linear(x2, (w.float() * s.unsqueeze(-1)).to(dtype))
        else:
            q, xs = rule.quantize(x2)
            # torchao's order: (int32 -> f32) * scale_x, cast to the output dtype, times the f32
            # weight scale (promotes to f32), plus bias, cast back
            y = (int8_mm(q, w).to(torch.float32) * xs).to(dtype) * s
        if module.bias is not None:
            y = y + module.bias
        return y.to(dtype).reshape(*shape[:-1], y.shape[-1])


register_kernel(Int8DynamicKernel)
