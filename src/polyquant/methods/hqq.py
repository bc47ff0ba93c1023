"""HQQ: half-quadratic quantization (mobiusml/hqq ``Quantizer.quantize`` + ``optimize.py``), no data.

Affine, asymmetric, group-wise; codes are ``uintB`` (B = 1..8) and the zero point is a *float in
code units*: ``w = (q - zero) * scale`` - exactly ``QuantizedWeight``'s dequantization.

Grouping (hqq reshapes the flattened weight):

- ``axis=1`` (hqq's and transformers' default): groups of ``group_size`` consecutive values of the
  row-major weight, i.e. ``block=(1, group_size)`` when ``in_features % group_size == 0`` and
  ``block=(group_size / in, in)`` (whole rows) when ``group_size`` is a multiple of ``in_features``;
  groups that straddle rows otherwise are refused by name. ``group_size=-1``: one group per row.
- ``axis=0``: hqq reshapes to ``[group_size, numel / group_size]``, so a group is ``group_size``
  rows *with a stride of* ``out / group_size`` in one column; ``QuantizedWeight`` can express that
  only when the group is the whole column (``group_size=-1`` or ``out_features``, ``block=(out, 1)``);
  smaller axis-0 groups are refused by name.

Per group (hqq keeps the *inverse* scale while optimizing): ``s = (2**B - 1) / (max - min)`` (1 when
``max - min <= 1e-4``; at most 2e4), ``z = -min * s`` (rounded when ``round_zero``: hqq's default for
4 bits only). ``optimize`` then updates only the zero by the half-quadratic proximal solver with an
l_p loss (p = ``lp_norm`` = 0.7): ``q = clamp(round(W*s + z))``, ``W_r = (q - z) / s``,
``W_e = shrink_p(W - W_r, beta)`` with ``shrink_p(x) = sign(x) * relu(|x| - |x|**(p-1) / beta)``,
``z = mean_group(q - (W - W_e) * s)``, ``beta *= kappa`` (beta = 10, kappa = 1.01), for ``iters``
(20) iterations. Early stop: the mean ``|W - W_r|`` over the whole weight is tracked and the loop
stops at the first iteration that does not improve it, keeping the best zero (hqq's
``optimize_weights_proximal_v2`` with ``early_stop``). Finally ``scale = 1 / s``.

hqq 0.2.8's *default* solver (``optimize_weights_proximal_legacy``) differs in two details: beta
stays fixed (kappa is not applied) and, at the early stop, it keeps the zero computed in the step
that found no improvement rather than the best one. On the default model both give the same
perplexity to 0.03% (3-bit g64: 119.236 here, 119.216 with the legacy rule and hqq itself 119.216,
all on float32 dequantization; 4-bit g64 on the bf16 ``cpu-int4`` kernel: 16.745 vs 16.742 with the
legacy rule, hqq 16.728 on its float32 one).

Run time: on CPUs with AVX-512, ``auto`` runs 1- to 4-bit HQQ weights on ``cpu-lut4`` (compiled,
float32 activations and tables: hqq's own numerics) - 3-bit g64 119.236 vs hqq's 119.216 (x1.0002),
4-bit 16.734 vs 16.728, both decoding at ~40 tok/s against hqq's 5.6-6.5 on the default model.
Elsewhere they run on ``cpu-int4`` (PyTorch's packed int4 op, bf16 activations and scales / zeros):
free at 4 bits, but at 3 bits the bf16 rounding costs +2.1% perplexity (121.69); pass
``kernel="cpu-lut4"`` or ``"reference"`` for float32 numerics there.

The solver is vectorized over every group of a weight and processed in row chunks that stay in
cache (the iterations are memory-bound); hqq's global early-stop decision is unchanged. ``W*s`` and
its group means are computed once (the scale is fixed), and the new zero is
``mean(q) - mean(W*s) + s * mean(W_e)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["HQQConfig", "hqq_quantize", "hqq_grouping", "hqq_init_params", "hqq_optimize_zero"]

_CHUNK = 1 << 17  # elements per solver chunk (512 KB per fp32 temporary: stays in L2)


@dataclass
class HQQConfig(MethodConfig):
    """HQQ (half-quadratic quantization).

    Attributes:
        bits: 1..8 (hqq itself supports 1, 2, 3, 4, 5, 6, 8).
        group_size: values per group along ``axis``; -1 for one group per row (axis 1) / column (axis 0).
        axis: 1 (groups along the input dim; hqq's and transformers' default) or 0 (see module doc).
        optimize: run the proximal zero-point solver (False: plain min-max rounding).
        round_zero: round the initial zero point; None = hqq's default (True for 4 bits only).
        lp_norm: p of the l_p loss (0 < p <= 1).
        beta, kappa: initial penalty and its growth per iteration (kappa >= 1).
        iters: maximum solver iterations.
        early_stop: stop at the first iteration whose mean error does not improve (keep the best zero).
        compute_dtype: dtype of the stored scale / zero (hqq's ``compute_dtype``).
    """

    bits: int = 4
    group_size: int = 64
    axis: int = 1
    optimize: bool = True
    round_zero: bool | None = None
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    compute_dtype: str = "float32"

    def validate(self) -> None:
        check_int("bits", self.bits, 1, 8)
        check_int("group_size", self.group_size)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")
        check_choice("axis", self.axis, (0, 1))
        for f in ("optimize", "early_stop"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be a bool, got {getattr(self, f)!r}")
        if self.round_zero is not None and not isinstance(self.round_zero, bool):
            raise ValueError(f"round_zero must be a bool or None, got {self.round_zero!r}")
        if not 0 < float(self.lp_norm) <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if not float(self.beta) > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not float(self.kappa) >= 1:
            raise ValueError(f"kappa must be >= 1, got {self.kappa}")
        check_int("iters", self.iters, 1, 10000)
        check_choice("compute_dtype", self.compute_dtype, ("float32", "float16", "bfloat16"))

    @property
    def rounds_zero(self) -> bool:
        return self.bits == 4 if self.round_zero is None else self.round_zero

    def describe(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"hqq w{self.bits} {g}{'' if self.axis == 1 else ' axis0'}{'' if self.optimize else ' no-opt'}"


def hqq_grouping(shape: tuple[int, int], group_size: int, axis: int) -> tuple[int, tuple[int, int]]:
    """``(group_size, block)`` for hqq's grouping of an ``[out, in]`` weight; ValueError naming the
    reason when ``QuantizedWeight`` cannot express it."""
    out, inp = shape
    if axis == 1:
        gs = inp if group_size in (-1, inp) else group_size
        if inp % gs == 0:
            return gs, (1, gs)
        if gs % inp == 0 and out % (gs // inp) == 0:  # a group is gs / in whole rows
            return gs, (gs // inp, inp)
        raise ValueError(f"hqq axis=1 groups of {gs} flattened values straddle rows of a weight with "
                         f"in_features={inp}; use a group_size dividing in_features (or a multiple of it "
                         f"dividing the weight)")
    gs = out if group_size in (-1, out) else group_size
    if gs != out:
        raise ValueError(f"hqq axis=0 groups of {gs} < out_features={out} gather rows with a stride of "
                         f"out/{gs}, which a QuantizedWeight block cannot express; use axis=1 or group_size=-1")
    return gs, (out, 1)


def hqq_init_params(wg: torch.Tensor, bits: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse scale and zero ``[G, 1]`` of grouped values ``wg [G, n]`` from min / max (hqq's init)."""
    max_v = float(2 ** bits - 1)
    mn = wg.amin(-1, keepdim=True)  # (torch.aminmax is ~5x slower than both on CPU)
    mx = wg.amax(-1, keepdim=True)
    denom = mx - mn
    scale = max_v / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.ones_like(scale), scale).clamp(max=2e4)
    zero = -mn * scale
    if round_zero:
        zero = torch.round(zero)
    return scale, zero


def hqq_optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, *,
                      lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                      early_stop: bool = True) -> torch.Tensor:
    """The half-quadratic proximal solver for the zero point (scale fixed): returns the new zero."""
    max_v = float(2 ** bits - 1)
    rows, n = wg.shape
    chunk = max(1, _CHUNK // max(n, 1))
    numel = wg.numel()
    best_err = math.inf
    best_zero = zero
    p1 = float(lp_norm) - 1.0
    # W*s and its group means do not change between iterations (the scale is fixed): once
    ws_all = wg * scale
    ws_mean = ws_all.mean(-1, keepdim=True)
    for _ in range(int(iters)):
        inv_beta = 1.0 / beta
        new_zero = torch.empty_like(zero)
        err = 0.0
        for r0 in range(0, rows, chunk):
            w = wg[r0:r0 + chunk]
            s = scale[r0:r0 + chunk]
            z = zero[r0:r0 + chunk]
            ws = ws_all[r0:r0 + chunk]
            q = torch.add(ws, z).round_().clamp_(0.0, max_v)
            d = torch.sub(q, z).div_(s)           # W_r
            torch.sub(w, d, out=d)                # W - W_r
            a = d.abs()
            err += float(a.sum())
            if lp_norm == 1:
                e = a.sub_(inv_beta)
            else:  # |x|**(p-1) as exp((p-1) log|x|): 3-4x faster than pow on CPU, same to 1 ulp-ish
                e = a.log().mul_(p1).exp_().mul_(-inv_beta).add_(a)
            e = torch.copysign(e.clamp_min_(0.0), d)  # W_e = shrink_p(W - W_r) (0 where W == W_r)
            # zero = mean(q - (W - W_e) * s) = mean(q) - mean(W*s) + s * mean(W_e)  (s is per group)
            new_zero[r0:r0 + chunk] = (q.mean(-1, keepdim=True) - ws_mean[r0:r0 + chunk]
                                       + e.mean(-1, keepdim=True) * s)
        err /= numel
        if early_stop:
            if err < best_err:
                best_err, best_zero = err, zero
            else:
                return best_zero
        zero = new_zero
        beta *= kappa
    return zero


def hqq_quantize(weight: torch.Tensor, config: HQQConfig, stats: dict | None = None) -> QuantizedWeight:
    """HQQ-quantize one ``[out, in]`` weight."""
    w = weight.detach()
    if w.dim() != 2:
        raise ValueError(f"HQQ quantizes 2-D weights, got shape {tuple(w.shape)}")
    out, inp = int(w.shape[0]), int(w.shape[1])
    gs, block = hqq_grouping((out, inp), config.group_size, config.axis)
    w = w.float()
    wg = w.reshape(-1, gs) if config.axis == 1 else w.t().contiguous()  # [G, n]
    scale, zero = hqq_init_params(wg, config.bits, config.rounds_zero)
    # NaN / Inf anywhere in a group shows in its min / max: a NaN / -Inf makes the zero NaN, a +Inf
    # makes the inverse scale 0 (cheaper than scanning the whole weight)
    if not (bool(torch.isfinite(zero).all()) and bool((scale > 0).all())):
        raise ValueError("weight contains NaN or Inf values")
    if config.optimize:
        zero = hqq_optimize_zero(wg, scale, zero, config.bits, lp_norm=config.lp_norm, beta=config.beta,
                                 kappa=config.kappa, iters=config.iters, early_stop=config.early_stop)
    codes = torch.add(wg * scale, zero).round_().clamp_(0, 2 ** config.bits - 1).to(torch.uint8)
    dt = getattr(torch, config.compute_dtype)
    inv = (1.0 / scale).to(dt)
    zero = zero.to(dt)
    if config.axis == 1:
        codes = codes.reshape(out, inp)
        grid = (out // block[0], inp // block[1])
    else:
        codes = codes.t()
        grid = (1, inp)
    return QuantizedWeight.from_codes(codes.contiguous(), f"uint{config.bits}", block,
                                      inv.reshape(grid).contiguous(), zero.reshape(grid).contiguous())


register_method(MethodSpec(
    name="hqq",
    config_cls=HQQConfig,
    quantize_weight=hqq_quantize,
    needs_calibration=False,
    family="integer weight-only",
    bits=(1, 2, 3, 4, 5, 6, 8),
    formats=("hqq",),
    description="half-quadratic zero-point optimization (l_p, p=0.7) of min-max affine groups; no data",
    reference="Badri & Shaji 2023, mobiusml/hqq",
    order=40,
    memory_factor=3.5,  # in memory it peaked at 3.2x the float32 model (19.6 GB for the 1.5B benchmark model)
    presets=(Preset("hqq-w4-g64", {"bits": 4, "group_size": 64}),),
    priors=(Prior(8, None, None, rel(14.041), "assumed: as int8 per-row absmax (" + BENCH + ": pq-torchao-int8 14.041)"),
            Prior(4, None, None, rel(16.734), BENCH + ": pq-hqq-w4-g64 16.734 (hqq 0.2 itself: 16.728)"),
            Prior(2, None, None, rel(6e5), "assumed: 2-bit round-to-nearest collapses (" + BENCH
                  + ": quanto qint2 6.06e6)")),
))
