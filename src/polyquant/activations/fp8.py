"""FP8 activations: the saturating float8 cast and the activation rule (:class:`Fp8ActQuant`); the
kernels for float8 weights (``fp8-emulated``, ``fp8-scaled-mm``) are in :mod:`polyquant.kernels.fp8`.

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

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["FP8_MAX", "fp8_saturate", "Fp8ActQuant", "RECIPES", "is_fp8_act"]

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


@register_act_rule
class Fp8ActQuant(ActivationQuantizer):
    """Float8 (e4m3) activation quantization: dynamic per token (or per token and group of
    ``group_size`` input channels), or static per tensor with a fixed ``scale``.

    Args:
        recipe: ``fbgemm``, ``deepseek`` or ``ct`` (how the scale is derived and applied; module
            docstring).
        group_size: input channels per scale (None: the whole row).
        scale_ub: upper bound on a row's ``amax`` (FBGEMM's ``activation_scale_ub``); None: none.
        scale: a static per-tensor scale (one positive value): ``q = sat(x / scale)``.
    """

    kind = "fp8"

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

    @property
    def rule(self) -> ActRule:
        gran = "tensor" if self.static else ("token" if self.group_size is None else "group")
        clamp = (RECIPES[self.recipe][1] or None, self.scale_ub)
        return ActRule(self.kind, "float8_e4m3fn", gran, self.group_size, dynamic=not self.static,
                       clamp=None if clamp == (None, None) else clamp, recipe=self.recipe)

    @classmethod
    def from_rule(cls, rule: ActRule, scale: torch.Tensor | None = None, **tensors) -> "Fp8ActQuant":
        return cls(rule.recipe, rule.group_size, rule.clamp[1] if rule.clamp else None, scale)

    def extra_repr(self) -> str:
        what = (f"static scale={float(self.scale[0]):.4g}" if self.static
                else "per token" if self.group_size is None else f"per token, groups of {self.group_size}")
        ub = f", scale_ub={self.scale_ub:g}" if self.scale_ub is not None else ""
        return f"e4m3 {self.recipe}, {what}{ub}"


def is_fp8_act(act: Any) -> bool:
    return getattr(act, "kind", None) == Fp8ActQuant.kind
