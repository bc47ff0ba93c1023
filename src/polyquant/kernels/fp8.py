"""FP8 at run time: the kernels for float8 weights, ``fp8-emulated`` (CPU) and ``fp8-scaled-mm``
(CUDA, ``torch._scaled_mm``). The activation rule they run (:class:`Fp8ActQuant`, the saturating
cast and the scale recipes) is :mod:`polyquant.activations.fp8`, re-exported here.

The GPU kernels call :meth:`Fp8ActQuant.quantize` and feed ``q``/``s`` to an fp8 x fp8 matmul that
applies the scales to its fp32 accumulator; the CPU kernel computes ``(q * s) @ W_deq.T`` in fp32 --
the same numbers up to fp32 summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyquant.activations.fp8 import E4M3, FP8_MAX, RECIPES, Fp8ActQuant, fp8_saturate, is_fp8_act
from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.triton_util import triton_available

__all__ = ["FP8_MAX", "fp8_saturate", "Fp8ActQuant", "RECIPES", "Fp8EmulatedKernel", "Fp8ScaledMMKernel",
           "fp8_scaled_mm", "is_fp8_act"]


# -- CPU: emulation ------------------------------------------------------------------------------
class Fp8EmulatedKernel(Kernel):
    """float8 weights on CPU: the weight dequantized once to fp32, activations quantized by the
    layer's :class:`Fp8ActQuant` exactly as the GPU kernels do, the product in fp32 (output cast
    back to the input dtype). It keeps an fp32 copy of each weight at run time.

    The fp32 copy is a run-time cache built on the layer's first forward, not in ``prepare``: a model
    quantized to be saved (``polyquant quantize``) never needs it, and building it eagerly cost ~0.2 s
    and 4 bytes per weight (424 MB on the default model) during quantization. ``set_kernel`` (a
    device move, another kernel) drops it with the other kernel buffers."""

    name = "fp8-emulated"
    devices = ("cpu",)
    priority = 10
    layouts = "float8 (e4m3/e5m2) weights, any block; fp8 activations emulated in fp32 (CPU)"
    fast = False

    def check(self, qw, device):
        if qw.qt.kind != "float":
            return f"needs float8 weights, got {qw.qtype}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras are not float8 layouts"
        return None

    def prepare(self, qw):
        return {}  # the fp32 weight is built on the first forward (class doc)

    @staticmethod
    def _weight(module) -> torch.Tensor:
        w = module._buffers.get("k_w")
        if w is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever mode runs now
                w = module.quantized_weight.dequantize(torch.float32).contiguous()
            module.register_buffer("k_w", w, persistent=False)
        return w

    def forward(self, module, x):
        w = self._weight(module)
        act = module.act_quant
        if getattr(act, "kind", None) == Fp8ActQuant.kind:
            xf = act.fake_quant(x)
        else:
            xf = (act(x) if act is not None else x).float()
        bias = module.bias
        y = F.linear(xf, w, bias.float() if bias is not None else None)
        return y if y.dtype == x.dtype else y.to(x.dtype)


register_kernel(Fp8EmulatedKernel)


# -- CUDA: torch._scaled_mm ----------------------------------------------------------------------
def fp8_scaled_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(xq * xs) @ (wq * ws).T`` with row-wise scales: ``xq [M, K]`` and ``wq [N, K]`` float8_e4m3fn,
    ``xs [M, 1]`` and ``ws [1, N]`` fp32, accumulated in fp32 by ``torch._scaled_mm``."""
    m, n = xq.shape[0], wq.shape[0]
    return torch._scaled_mm(xq.contiguous(), wq.t(), scale_a=xs.float().expand(m, 1).contiguous(),
                            scale_b=ws.float().reshape(1, -1).expand(1, n).contiguous(), out_dtype=out_dtype)


_ROWWISE_OK: dict[str, str | None] = {}


def _rowwise_reason(device: torch.device) -> str | None:
    """Probe once per device whether ``torch._scaled_mm`` takes row-wise fp32 scales there."""
    key = str(device)
    if key not in _ROWWISE_OK:
        try:
            a = torch.ones(16, 32, device=device).to(E4M3)
            fp8_scaled_mm(a, torch.ones(16, 1, device=device), torch.ones(16, 32, device=device).to(E4M3),
                          torch.ones(1, 16, device=device))
            _ROWWISE_OK[key] = None
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - needs such a GPU
            _ROWWISE_OK[key] = f"torch._scaled_mm has no row-wise fp8 scaling here ({str(e).splitlines()[0]})"
    return _ROWWISE_OK[key]


class Fp8ScaledMMKernel(Kernel):
    """Per-channel / per-tensor e4m3 weights on CUDA through ``torch._scaled_mm`` (fp8 tensor
    cores, compute capability >= 8.9), when the layer quantizes activations per token or with a
    static scale (:class:`Fp8ActQuant`); output in bf16, cast to the input dtype. Layers without
    such a rule (weight-only, grouped activations) dequantize the weight per call instead."""

    name = "fp8-scaled-mm"
    devices = ("cuda",)
    priority = 30
    layouts = ("float8_e4m3fn weights per channel or per tensor, out/in % 16 == 0; fp8 per-token or "
               "static activations (torch._scaled_mm, CUDA cc >= 8.9)")
    min_capability = (8, 9)

    def check(self, qw, device):
        if qw.qtype != "float8_e4m3fn":
            return f"needs float8_e4m3fn weights, got {qw.qtype}"
        out, inp = qw.shape
        if qw.block not in ((1, inp), (out, inp)):
            return f"needs per-channel or per-tensor scales, got block {qw.block}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras are not supported"
        if out % 16 or inp % 16:
            return f"torch._scaled_mm needs out and in features divisible by 16, got {qw.shape}"
        if r := self._capability_reason(device):
            return r
        return _rowwise_reason(device) if device.type == "cuda" and torch.cuda.is_available() else None

    def prepare(self, qw):
        n = qw.shape[0]
        return {"ws": qw.scale.float().reshape(1, -1).expand(1, n).contiguous()}

    def forward(self, module, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = module.act_quant
        per_token = getattr(act, "kind", None) == Fp8ActQuant.kind and (
            act.static or act.group_size is None or act.group_size >= x2.shape[-1])
        if per_token and x2.shape[0] == 1 and x2.is_cuda and triton_available():  # decode: the rule fused into one kernel
            from polyquant.kernels.triton_gemv import fp8_gemv
            m = module._meta
            y = fp8_gemv(x2, act, module.qw_data, module.qw_scale, m["block"], torch.bfloat16)
        elif per_token:
            xq, xs = act.quantize(x2)
            y = fp8_scaled_mm(xq, xs, module.qw_data, module.kbuf("ws"))
        else:  # no fp8 x fp8 product for this activation rule: dequantize per call
            xf = act.fake_quant(x2) if getattr(act, "kind", None) == Fp8ActQuant.kind else (act(x2) if act is not None else x2)
            y = F.linear(xf.float(), module.quantized_weight.dequantize(torch.float32))
        if module.bias is not None:
            y = y.float() + module.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


register_kernel(Fp8ScaledMMKernel)
