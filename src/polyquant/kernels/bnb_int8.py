"""LLM.int8() at run time: the activation rule and the int8 x int8 kernel (``llm-int8``).

The rule (bitsandbytes ``int8_vectorwise_quant`` + ``int8_mixed_scaled_mm``): the input ``X [M, K]``
is cast to ``quant_dtype`` (float16, as bitsandbytes does); with a threshold ``t`` (0 or inf: off),
every input column holding some ``|x| >= t`` is an *outlier column*. Outlier entries are zeroed,
each row's absmax ``SCA`` is taken, ``CA = round(X * 127 / SCA)`` (int8) and the outlier columns of
``CA`` are zeroed. Then

    Y = (CA @ CB^T) * (SCA ⊗ SCB) / 127²  +  X[:, outliers] @ W_deq[:, outliers]^T  + bias

with ``CB``/``SCB`` the row-wise int8 weight of :mod:`polyquant.methods.bnb`.

Two paths compute it:

- the **reference** kernel calls :class:`LLMInt8Activation` as the layer's ``act_quant``: it
  fake-quantizes ``X`` (non-outlier columns become ``CA * SCA / 127``, outlier columns stay float)
  and multiplies with the dequantized weight - the same sum, in float;
- the ``llm-int8`` kernel (this module) runs the int8 product exactly with ``int8_dynamic.int8_mm``
  (``torch._int_mm``, padded to its shape rules on CUDA; float64 elsewhere), then adds the
  float outlier product. It takes only bitsandbytes int8 layouts (int8 codes, per-row scales and the
  ``SCB`` extra) and, without an LLM.int8 rule on the module, runs them weight-only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polyquant.activations.llm_int8 import LLMInt8Activation
from polyquant.kernels.base import Kernel, register_kernel
from polyquant.kernels.int8_dynamic import int8_mm

__all__ = ["LLMInt8Activation", "LLMInt8Kernel"]

_INV_127SQ = 1.0 / (127.0 * 127.0)


class LLMInt8Kernel(Kernel):
    name = "llm-int8"
    devices = ("cpu", "cuda")
    priority = 30
    layouts = "bitsandbytes int8 (row-wise absmax, SCB): int8 x int8 matmul + float outlier columns"
    graph_safe = False
    graph_unsafe_reason = "its outlier columns are found from the activations on the host (nonzero)"

    def check(self, qw, device):
        if qw.qtype != "int8":
            return f"needs bitsandbytes int8 weights, got {qw.qtype}"
        if qw.block != (1, qw.shape[1]) or qw.zero is not None or qw.g_idx is not None:
            return "needs symmetric per-row scales without act-order"
        if set(qw.extras) != {"SCB"}:
            return "needs bitsandbytes' SCB statistics (an int8 weight quantized by bnb-int8)"
        return None

    def prepare(self, qw):
        cb = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return {"CB": cb, "SCB": qw.extras["SCB"].float().contiguous(), "s": qw.scale[:, 0].float().contiguous()}

    def forward(self, module, x):
        rule = module.act_quant
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        cb, s = module.kbuf("CB"), module.kbuf("s")
        if getattr(rule, "kind", None) != LLMInt8Activation.kind:  # weight-only use of the int8 layout
            w = (cb.float() * s.unsqueeze(-1)).to(x.dtype)
            return F.linear(x, w, module.bias)
        ca, sca, cols = rule.quantize(x2)
        acc = int8_mm(ca, cb)
        y = acc.float() * (sca.unsqueeze(-1) * module.kbuf("SCB").unsqueeze(0)) * _INV_127SQ
        if module.bias is not None:
            y = y + module.bias.float()
        y = y.to(x.dtype)
        if cols is not None:
            w_cols = (cb[:, cols].float() * s.unsqueeze(-1)).to(x.dtype)
            y = y.addmm(x2[:, cols], w_cols.t())
        return y.reshape(*shape[:-1], y.shape[-1])


register_kernel(LLMInt8Kernel)
