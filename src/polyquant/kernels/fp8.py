"""FP8 at run time: the saturating float8 cast, the activation rule (:class:`Fp8ActQuant`), and the
kernels for float8 weights: ``fp8-emulated`` (CPU) and ``fp8-scaled-mm`` (CUDA, ``torch._scaled_mm``).

The cast (:func:`fp8_saturate`): clamp to the format's largest finite value (``448`` for e4m3fn,
``57344`` for e5m2), then torch's float8 cast, which rounds to nearest even. The clamp matters:
torch's plain cast turns an out-of-range value into NaN for e4m3fn (it has no infinity).

The activation rule, one definition for every device. For each row (token) of ``x [..., K]`` and
each group of ``group_size`` columns (the whole row when ``group_size`` is None; a shorter last
group is allowed), ``amax = max |x|`` over the group (in fp32), then per *recipe*:

===========  ================================================  ==================================
recipe       scale ``s`` and codes ``q``                       source
===========  ================================================  ==================================
``fbgemm``   ``a = clamp(amax, 1e-12, ub)``, ``inv = 448 / a``,  FBGEMM ``_kernel_quantize_fp8_row``
             ``q = sat(x * inv)``, ``s = 1 / inv``             (transformers ``fbgemm_fp8``)
``deepseek`` ``s = max(amax, 1e-4) / 448``, ``q = sat(x / s)``   DeepSeek-V3 ``act_quant``
                                                               (transformers ``fp8``)
``ct``       ``s = amax / 448`` (0 -> fp32 eps),                compressed-tensors dynamic
             ``q = sat(x / s)``; static: the stored ``s``       ``float`` activations
===========  ================================================  ==================================

and the activation the matmul sees is ``q * s`` (fp32). The GPU kernels call
:meth:`Fp8ActQuant.quantize` and feed ``q``/``s`` to an fp8 x fp8 matmul that applies the scales to
its fp32 accumulator; the CPU kernel computes ``(q * s) @ W_deq.T`` in fp32 -- the same numbers up
to fp32 summation order.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.kernels.base import Kernel, register_kernel

__all__ = ["FP8_MAX", "fp8_saturate", "Fp8ActQuant", "RECIPES", "Fp8EmulatedKernel", "Fp8ScaledMMKernel",
           "fp8_scaled_mm", "is_fp8_act"]

E4M3 = torch.float8_e4m3fn
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_EPS32 = torch.finfo(torch.float32).eps

#: recipe -> (rounding, amax floor): see the module docstring
RECIPES: dict[str, tuple[str, float]] = {"fbgemm": ("mul", 1e-12), "deepseek": ("div", 1e-4), "ct": ("div", 0.0)}


def fp8_saturate(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``x`` rounded to the nearest ``dtype`` value (ties to even), out-of-range values saturated
    to +-max. NaN stays NaN."""
    m = FP8_MAX[dtype]
    return torch.clamp(x, -m, m).to(dtype)


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[..., K]`` -> ``[..., ceil(K/g), g]`` (zero padded)."""
    k = x.shape[-1]
    pad = -k % g
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (x.shape[-1] // g, g))


class Fp8ActQuant(nn.Module):
    """Float8 (e4m3) activation quantization: dynamic per token (or per token and group of
    ``group_size`` input channels), or static per tensor with a fixed ``scale``.

    Args:
        recipe: ``fbgemm``, ``deepseek`` or ``ct`` (how the scale is derived and applied; module
            docstring).
        group_size: input channels per scale (None: the whole row).
        scale_ub: upper bound on a row's ``amax`` (FBGEMM's ``activation_scale_ub``); None: none.
        scale: a static per-tensor scale (one positive value): ``q = sat(x / scale)``.
    """

    def __init__(self, recipe: str = "ct", group_size: int | None = None, scale_ub: float | None = None,
                 scale: torch.Tensor | float | None = None) -> None:
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        if scale_ub is not None:
            if isinstance(scale_ub, bool) or not isinstance(scale_ub, (int, float)) or not (
                    math.isfinite(scale_ub) and scale_ub > 0):
                raise ValueError(f"scale_ub must be a positive finite number or None, got {scale_ub!r}")
            scale_ub = float(scale_ub)
        self.recipe = recipe
        self.group_size = group_size
        self.scale_ub = scale_ub
        if scale is not None:
            s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1)
            if s.numel() != 1 or not bool(torch.isfinite(s).all()) or float(s[0]) <= 0:
                raise ValueError(f"a static activation scale must be one positive finite value, got {scale!r}")
            if group_size is not None:
                raise ValueError("a static (per-tensor) activation scale takes no group_size")
            self.register_buffer("scale", s.clone(), persistent=False)
        else:
            self.scale = None

    @property
    def static(self) -> bool:
        return self.scale is not None

    @property
    def ct_args(self) -> dict[str, Any] | None:
        """compressed-tensors ``input_activations`` for the ``ct`` recipe (None for the others:
        compressed-tensors computes activation scales its own way)."""
        if self.recipe != "ct" or self.scale_ub is not None:
            return None
        d: dict[str, Any] = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not self.static}
        if self.static:
            d["strategy"] = "tensor"
        elif self.group_size is not None:
            d.update(strategy="group", group_size=self.group_size)
        else:
            d["strategy"] = "token"
        return d

    # -- the definition ----------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., K]`` -> codes ``q`` (float8_e4m3fn ``[..., K]``) and fp32 scales ``s``
        ``[..., G]`` (G = 1 per token / static, ``ceil(K / group_size)`` per group)."""
        xf = x.float()
        lead, k = xf.shape[:-1], xf.shape[-1]
        if self.static:
            s = self.scale.to(xf.device).reshape(*([1] * xf.dim()))
            return fp8_saturate(xf / s), s.expand(*lead, 1)
        g = self.group_size if self.group_size is not None and self.group_size < k else max(k, 1)
        xg = _groups(xf, g)  # [..., G, g]
        amax = xg.abs().amax(dim=-1, keepdim=True)
        rounding, floor = RECIPES[self.recipe]
        if floor > 0:
            amax = amax.clamp(min=floor)
        if self.scale_ub is not None:
            amax = amax.clamp(max=self.scale_ub)
        # every division is tensor / tensor of the same shape: IEEE-rounded on every device (torch
        # evaluates `python float / tensor` as float * reciprocal(tensor), and CUDA divides by a
        # scalar through its reciprocal: both round twice)
        if rounding == "mul":
            inv = torch.full_like(amax, 448.0) / amax
            q = fp8_saturate(xg * inv)
            s = torch.reciprocal(inv)
        else:
            s = amax / torch.full_like(amax, 448.0)
            if floor == 0:
                s = torch.where(s == 0, torch.full_like(s, _EPS32), s)
            q = fp8_saturate(xg / s)
        q = q.flatten(-2)[..., :k]
        return q, s.squeeze(-1)

    def dequantize(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``q * s`` in fp32 (``q [..., K]``, ``s [..., G]``)."""
        k = q.shape[-1]
        if s.shape[-1] == 1:
            return q.float() * s
        return (_groups(q.float(), self.group_size) * s.unsqueeze(-1)).flatten(-2)[..., :k]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The activation the matmul sees, in fp32."""
        return self.dequantize(*self.quantize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x).to(x.dtype)

    def extra_repr(self) -> str:
        what = (f"static scale={float(self.scale[0]):.4g}" if self.static
                else "per token" if self.group_size is None else f"per token, groups of {self.group_size}")
        ub = f", scale_ub={self.scale_ub:g}" if self.scale_ub is not None else ""
        return f"e4m3 {self.recipe}, {what}{ub}"


def is_fp8_act(act: Any) -> bool:
    return isinstance(act, Fp8ActQuant)


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

    def supports(self, qw, device):
        if r := self._device_reason(device):
            return r
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
        if isinstance(act, Fp8ActQuant):
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

    def supports(self, qw, device):
        if r := self._device_reason(device):
            return r
        if qw.qtype != "float8_e4m3fn":
            return f"needs float8_e4m3fn weights, got {qw.qtype}"
        out, inp = qw.shape
        if qw.block not in ((1, inp), (out, inp)):
            return f"needs per-channel or per-tensor scales, got block {qw.block}"
        if qw.zero is not None or qw.g_idx is not None or qw.extras:
            return "zero points / act-order / extras are not supported"
        if out % 16 or inp % 16:
            return f"torch._scaled_mm needs out and in features divisible by 16, got {qw.shape}"
        if device.type == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                return f"needs compute capability >= {self.min_capability}, got {cap}"
            return _rowwise_reason(device)
        return None

    def prepare(self, qw):
        n = qw.shape[0]
        return {"ws": qw.scale.float().reshape(1, -1).expand(1, n).contiguous()}

    def forward(self, module, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = module.act_quant
        if isinstance(act, Fp8ActQuant) and (act.static or act.group_size is None
                                             or act.group_size >= x2.shape[-1]):
            xq, xs = act.quantize(x2)
            y = fp8_scaled_mm(xq, xs, module.qw_data, module.kbuf("ws"))
        else:  # no fp8 x fp8 product for this activation rule: dequantize per call
            xf = act.fake_quant(x2) if isinstance(act, Fp8ActQuant) else (act(x2) if act is not None else x2)
            y = F.linear(xf.float(), module.quantized_weight.dequantize(torch.float32))
        if module.bias is not None:
            y = y.float() + module.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)


register_kernel(Fp8ScaledMMKernel)
