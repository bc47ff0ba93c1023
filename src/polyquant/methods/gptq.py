"""GPTQ (Frantar et al. 2022): quantize a Linear's weight column by column, spreading each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, so that ``||W X - Q X||^2`` stays small.

As in the reference code (IST-DASLab/gptq ``gptq.py``, AutoGPTQ ``fasterquant``):
dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column; dampening adds
``damp_percent * mean(diag H)`` to the diagonal (raised x10, with a warning, while the Cholesky
factorisation fails); the upper Cholesky factor of ``H^-1`` drives the updates, done lazily in
blocks of ``block_size`` columns; a group's scale and zero are computed from the current,
error-updated weights when the loop reaches the group (``static_groups``: all up front from the
original weights); ``act_order`` processes columns by decreasing ``diag(H)`` and records each
column's group in ``g_idx`` (``g_idx[c] = position of c in that order // group_size``).
Scales follow ``tensor/affine.py``: symmetric ``absmax / (2**(b-1) - 0.5)`` (= GPTQ's
``2 * absmax / maxq`` with zero ``(maxq+1)/2``), asymmetric min/max with an integer zero.
``mse`` searches a shrink factor per row (group) minimising ``sum |w - q|^2.4`` (GPTQ's ``mse``).
By default columns go in group-aware order (GAR, as GPTQModel and transformers do): whole groups,
most important first, columns by decreasing ``diag(H)`` inside; this needs no ``g_idx``. On the
default model (W4 g64 sym, 32 x 512 calibration, 40 x 512 pydoc windows) the reference order gives
ppl 18.40, GAR 16.24, act-order 16.11 (fp32 14.01, RTN 20.25).

Checked step by step against GPTQModel 7.6 (``GPTQ.quantize`` fed the very same Hessian, 32 x 512
pydoc calibration windows, six Linears of the default model from blocks 0, 15 and 29, W4 g64 sym,
group-aware order; ``benchmarks/gptq_layer_vs_gptqmodel.py``): with fp32 scales and
``group_params="pending"`` the two pick the same grid point for 99.7-99.98% of the weights at equal
``damp_percent`` (the rest: float rounding carried along a row by the error feedback). The one
difference that mattered is where a group's scale comes from when the group starts inside a lazy
block (with g64 and blocks of 128, every second group): the reference code (IST-DASLab, AutoGPTQ,
GPTQModel) takes it from the weights as the previous blocks left them ("pending"), this module
formerly from the fully error-updated ones ("updated", still available). On one Linear the two give
the same output error to 3 digits, on the calibration Hessian and on held-out ones, yet they agree
on only 80-90% of the grid points, and end to end "pending" is better on both texts: W4 g64 sym,
32 x 512 pydoc calibration, 40 windows each, damp 0.05: pydoc / enwiki perplexity 16.10 / 36.34
pending, 16.28 / 39.96 updated (GPTQModel 16.15 / 34.61). The pending scale is fitted to weights
that have not yet taken the block's error feedback, so the columns that grew are clamped: a milder
fit of the calibration text. With it, dampening no longer needs to carry the generalization:
the default is GPTQModel's 0.05 (0.1 gave 16.69 / 36.88, 0.01 in IST-DASLab/AutoGPTQ), and the
remaining gap to GPTQModel out of domain comes mostly from its bf16 weights and forwards on a CPU
(polyquant with bf16 weights and ``Calibration(autocast=torch.bfloat16)``: 16.25 / 35.78);
polyquant keeps exact fp32 by default (``Calibration.autocast``).
Scales are rounded to the stored float16 when the weight is finished (``scale_rounding="pack"``,
GPTQModel's rule: it rounds when packing), not as each is chosen (``"loop"``, the former default):
same setting, seeds 0 / 1 / 2, pydoc / enwiki 16.27 / 35.11, 16.19 / 34.27, 16.41 / 34.99 pack
(means 16.29 / 34.79), 16.10 / 36.34, 16.29 / 36.13, 16.58 / 36.66 loop (16.32 / 36.38), seed 0
16.23 / 34.79 with unrounded float32 scales; GPTQModel 16.15 / 34.61, 16.23 / 34.27, 16.44 / 35.13
(16.27 / 34.67).

Thread count: the factorisation, the inverse and the column loop run on one thread, so a given
weight and Hessian give the same codes at any torch thread count (tested), and a tiny model gives
the same checkpoint at 1 and 2 threads (tested). On a real model the Hessians come from float32
block forwards and ``x^T x`` products whose rounding depends on how the BLAS splits them across
threads (about 1e-7 relative); one rounding decided the other way is carried along its row by the
error feedback, so checkpoints made at different thread counts are equivalent in quality but not
bit-identical. For bit-identical checkpoints quantize at the same thread count.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from polyquant.methods._hessian import hessian_inputs, zero_dead_inputs
from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.methods.rtn import validate_group_size
from polyquant.qtypes import QType, int_qtype
from polyquant.tensor.affine import choose_qparams
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["GPTQConfig", "gptq_quantize"]

GPTQ_BITS = (2, 3, 4, 8)
GROUP_PARAMS = ("pending", "updated")  # GPTQConfig.group_params
SCALE_ROUNDING = ("pack", "loop")  # GPTQConfig.scale_rounding
MAX_DAMP_RETRIES = 4  # damp_percent x10 each time: 0.01 -> 100 at most
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: input columns per scale; -1 for per channel.
        sym: symmetric (signed codes, no zero point) or asymmetric (integer zero point).
        act_order: process columns by decreasing Hessian diagonal ("desc_act").
        static_groups: compute every group's scale/zero before the loop (with act_order: groups
            stay contiguous, ``g_idx = c // group_size``).
        damp_percent: dampening, as a fraction of the mean Hessian diagonal.
        block_size: columns per lazy-update block.
        true_sequential: quantize a block's Linears group by group (q/k/v, o, gate/up, down), each
            calibrated with the earlier groups already quantized.
        mse: search a shrink factor of each group's range (minimises ``|w - q|^mse_norm``).
        mse_grid: shrink steps of 1/mse_grid; mse_max_shrink: largest shrink tried.
        mse_norm: exponent of the search's error.
        scale_dtype: the dtype whose values the stored scales take (GPTQ checkpoints store
            float16; ``float32`` keeps them unrounded).
        scale_rounding: when scales are rounded to ``scale_dtype``. ``"pack"`` (default, as
            GPTQModel / AutoGPTQ, which round when packing): the column loop quantizes and feeds
            back the error against the float32 scales, and the finished weight's scales are rounded
            once; the codes are kept, so the returned weight is exactly what a checkpoint stores.
            ``"loop"``: each scale is rounded as it is chosen, so the loop's codes and error feedback
            use the stored scale (measured worse out of domain: see the module docstring).
        group_params: where a group's scale (and zero) comes from when the loop reaches it.
            ``"pending"`` (default, as IST-DASLab/gptq, AutoGPTQ and GPTQModel): the weights as the
            previous lazy blocks left them, without the updates of the current block's earlier
            columns; the current block's updated columns are then quantized on that grid (clamped
            where they outgrew it). ``"updated"``: the fully error-updated weights (every earlier
            column's feedback included); it fits the calibration Hessian as well but generalizes
            worse end to end (see the module docstring).
        act_group_aware: group-aware reordering (GAR; the default of GPTQModel and transformers):
            whole groups in order of importance, columns by decreasing ``diag(H)`` inside each; no
            ``g_idx`` is needed, so the fast contiguous-group kernels apply. None (default): on unless
            ``act_order`` or ``static_groups`` is set; False: the reference column order.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.05
    block_size: int = 128
    true_sequential: bool = True
    mse: bool = False
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    scale_dtype: str = "float16"
    scale_rounding: str = "pack"
    act_group_aware: bool | None = None
    group_params: str = "pending"

    def validate(self) -> None:
        if self.bits not in GPTQ_BITS or isinstance(self.bits, bool):
            raise ValueError(f"bits must be one of {list(GPTQ_BITS)}, got {self.bits!r}")
        validate_group_size(self.group_size)
        for name in ("sym", "act_order", "static_groups", "true_sequential", "mse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.act_group_aware is not None and not isinstance(self.act_group_aware, bool):
            raise ValueError(f"act_group_aware must be None (auto), True or False, got {self.act_group_aware!r}")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 < self.damp_percent < 1e3 or not math.isfinite(self.damp_percent):
            raise ValueError(f"damp_percent must be a positive number, got {self.damp_percent!r}")
        check_int("block_size", self.block_size, 1, 1 << 16)
        check_int("mse_grid", self.mse_grid, 1, 10000)
        if not 0 <= float(self.mse_max_shrink) < 1:
            raise ValueError(f"mse_max_shrink must be in [0, 1), got {self.mse_max_shrink}")
        if not float(self.mse_norm) > 0:
            raise ValueError(f"mse_norm must be positive, got {self.mse_norm}")
        check_choice("scale_dtype", self.scale_dtype, tuple(_SCALE_DTYPES))
        check_choice("group_params", self.group_params, GROUP_PARAMS)
        check_choice("scale_rounding", self.scale_rounding, SCALE_ROUNDING)
        if self.act_group_aware and (self.act_order or self.static_groups):
            raise ValueError("act_group_aware reorders columns inside whole groups; it excludes act_order "
                             "and static_groups")

    @property
    def group_aware(self) -> bool:
        """Whether group-aware reordering applies (``act_group_aware`` resolved)."""
        if self.act_group_aware is None:
            return not (self.act_order or self.static_groups)
        return self.act_group_aware

    def describe(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        extra = "".join([" act-order" if self.act_order else "", " static" if self.static_groups else "",
                         " gar" if self.group_aware else "",
                         " mse" if self.mse else "",
                         " updated-params" if self.group_params == "updated" and not self.static_groups else "",
                         " loop-rounded" if self.scale_rounding == "loop" and self.scale_dtype != "float32" else ""])
        return f"gptq w{self.bits} {g} {'sym' if self.sym else 'asym'}{extra}"


# -- scale / zero of a group -------------------------------------------------------------------
def _fake(x: torch.Tensor, qt: QType, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize with broadcasting scale/zero (same arithmetic as the main loop)."""
    if zero is None:
        return torch.clamp(torch.round(x / scale), qt.qmin, qt.qmax) * scale
    return (torch.clamp(torch.round(x / scale) + zero, 0, qt.qmax) - zero) * scale


def _group_params(x: torch.Tensor, qt: QType, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale (and zero) of ``x [out, n]``, shapes ``[out]``."""
    scale, zero = choose_qparams(x, qt, (1, x.shape[1]))
    if config.mse:
        steps = int(config.mse_max_shrink * config.mse_grid)
        best = _fake(x, qt, scale, zero).sub_(x).abs_().pow_(config.mse_norm).sum(1, keepdim=True)
        chunk = max(1, min(16, (1 << 24) // max(1, x.numel())))  # shrink factors per vectorised step
        for c0 in range(1, steps, chunk):
            p = 1 - torch.arange(c0, min(c0 + chunk, steps), device=x.device, dtype=torch.float32) / config.mse_grid
            s, z = choose_qparams(x, qt, (1, x.shape[1]), shrink=p.view(-1, 1, 1))
            err = _fake(x.unsqueeze(0), qt, s, z).sub_(x).abs_().pow_(config.mse_norm).sum(2, keepdim=True)
            e_min, k = err.min(0)
            better = e_min < best  # strictly better only: the earliest (least shrunk) wins ties
            best = torch.where(better, e_min, best)
            scale = torch.where(better, s.gather(0, k.unsqueeze(0)).squeeze(0), scale)
            if zero is not None:
                zero = torch.where(better, z.gather(0, k.unsqueeze(0)).squeeze(0), zero)
    if config.scale_rounding == "loop":
        scale = _stored_scale(scale, config.scale_dtype)
    return scale[:, 0], (zero[:, 0] if zero is not None else None)


def _stored_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``scale`` rounded to the values of ``scale_dtype`` (what a checkpoint stores; kept positive
    and finite), still as float32."""
    dt = _SCALE_DTYPES[scale_dtype]
    if dt == torch.float32:
        return scale
    fi = torch.finfo(dt)
    return scale.clamp(fi.smallest_normal if dt == torch.bfloat16 else 2.0 ** -24, fi.max).to(dt).float()


# -- inverse Hessian ---------------------------------------------------------------------------
def _inverse_hessian_upper(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; dampening x10 on failure.

    Bit for bit ``cholesky(cholesky_inverse(cholesky(H + damp * mean(diag H) * I)), upper=True)``,
    computed in one new ``[n, n]`` buffer: the dampening is added to ``H``'s diagonal in place
    (restored before returning) and the factorisations write over their input, two to four ``n^2``
    buffers fewer at the peak than out-of-place calls (about 500 MB at n = 5632)."""
    diag = torch.diagonal(H)
    mean_diag = torch.mean(diag)  # over the strided view, as before (the same summation order)
    saved = diag.clone()
    damp = float(damp_percent)
    U = torch.empty_like(H)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    try:
        for attempt in range(MAX_DAMP_RETRIES + 1):
            diag.copy_(saved + damp * mean_diag)
            torch.linalg.cholesky_ex(H, out=(U, info))
            if int(info) == 0:
                torch.cholesky_inverse(U, out=U)
                torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
                if int(info) == 0 and torch.isfinite(U).all():
                    return U
            if attempt < MAX_DAMP_RETRIES:
                warnings.warn(f"GPTQ: the Hessian is not positive definite with damp_percent={damp:g}; "
                              f"retrying with {damp * 10:g}", RuntimeWarning, stacklevel=3)
                damp *= 10
    finally:
        diag.copy_(saved)
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damp_percent={damp:g} "
                     "(degenerate calibration inputs?); check the calibration data or raise damp_percent")


def _group_aware_order(diag: torch.Tensor, gs: int) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
    """Group-aware reordering (GAR, Gafni et al. 2025; GPTQModel's ``act_group_aware``): groups stay
    whole, most important group first (by its largest ``diag(H)``), columns inside a group by
    decreasing ``diag(H)``. Returns the permutation and where each group starts in it."""
    inp = diag.numel()
    groups = [torch.arange(g, min(g + gs, inp), device=diag.device) for g in range(0, inp, gs)]
    order = sorted(range(len(groups)), key=lambda k: -float(diag[groups[k]].max()))
    parts, starts, pos = [], {}, 0
    for k in order:
        cols = groups[k][torch.argsort(diag[groups[k]], descending=True)]
        parts.append(cols)
        starts[pos] = (k, pos + cols.numel())
        pos += cols.numel()
    return torch.cat(parts), starts


# -- the algorithm -----------------------------------------------------------------------------
def _column_loop(W, Hinv, vals, scales, zeros, static, col_group, starts, qt: QType, gs: int,
                 config: GPTQConfig) -> None:
    """The blocked column loop (lazy batch updates); fills ``vals`` (integer values, processing
    order) and, for dynamic groups, ``scales`` / ``zeros`` (``starts``: processing position where a
    group starts -> (its scale column, the position after its last column)).

    It works on the transposed weight (one input column = one contiguous row), so the rank-1 error
    update of the remaining columns of a block is one contiguous ``addr_``: on a CPU 3-4x faster than
    the same update on column slices of the ``[out, in]`` weight, with the same products."""
    inp = W.shape[1]
    Wt = W.t().contiguous()  # [in, out]
    valst = torch.empty_like(Wt)
    s = z = None
    B = int(config.block_size)
    pending = static is None and config.group_params == "pending"
    for i1 in range(0, inp, B):
        i2 = min(i1 + B, inp)
        W1 = Wt[i1:i2]  # a view: updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        W10 = W1.clone() if pending else None  # the block as the previous blocks left it
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                s, z = static[0] if gs == inp else static[col_group[col]]
            elif col in starts:  # a group starts: its parameters from the pending or the updated weights
                g, end = starts[col]
                if pending:
                    cur = W10[i:min(end - i1, i2 - i1)]
                    if end > i2:
                        cur = torch.cat([cur, Wt[i2:end]], 0)
                else:
                    cur = W1[i:min(end - i1, i2 - i1)]
                    if end > i2:  # the group runs past this block: bring in this block's pending updates
                        rest = Wt[i2:end] - Hinv[i1:col, i2:end].t() @ Err1[:i]
                        cur = torch.cat([cur, rest], 0)
                s, z = _group_params(cur.t(), qt, config)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            w = W1[i]
            if z is None:
                v = torch.clamp(torch.round(w / s), qt.qmin, qt.qmax)
                q = v * s
            else:
                v = torch.clamp(torch.round(w / s) + z, 0, qt.qmax)
                q = (v - z) * s
            valst[col] = v
            err = (w - q) / Hinv1[i, i]
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
            Err1[i] = err
        if i2 < inp:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    vals.copy_(valst.t())


@contextmanager
def _one_thread(device: torch.device):
    """The column loop is thousands of tiny ops: on CPU one thread is faster than several (no
    per-op synchronisation; many times faster when the cores are shared). Restored afterwards."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(weight: torch.Tensor, config: GPTQConfig, stats: dict | None) -> QuantizedWeight:
    """GPTQ of one ``[out, in]`` weight with ``stats = {"H": [in, in] Hessian, "n": samples}``.
    ``stats`` is not modified (it may be shared by Linears with the same input)."""
    W, H = hessian_inputs(weight, stats, "GPTQ")
    out, inp = W.shape
    qt = int_qtype(config.bits, signed=config.sym)
    gs = inp if config.group_size == -1 or config.group_size >= inp else config.group_size
    n_groups = math.ceil(inp / gs)

    zero_dead_inputs(W, H)

    static = None
    if gs == inp:  # per channel: parameters from the whole (dead-zeroed) row, once
        static = [_group_params(W, qt, config)]
    elif config.static_groups:
        static = [_group_params(W[:, g * gs:(g + 1) * gs], qt, config) for g in range(n_groups)]

    perm = None
    # dynamic groups: processing position where each starts -> (scale column, end position)
    starts = {k * gs: (k, min((k + 1) * gs, inp)) for k in range(n_groups)}
    if config.act_order or (config.group_aware and gs == inp):  # (per channel: one group)
        perm = torch.argsort(torch.diagonal(H), descending=True)
    elif config.group_aware:
        perm, starts = _group_aware_order(torch.diagonal(H), gs)
    if perm is not None:
        W, H = W[:, perm], H[perm]
        H = H[:, perm]  # two statements: the unpermuted copy is freed before the second
    with _one_thread(W.device):  # one thread: the factorisation's rounding does not depend on the thread count
        Hinv = _inverse_hessian_upper(H, config.damp_percent)
    del H

    vals = torch.empty_like(W)  # integer values (signed domain for sym), permuted order
    scales = torch.empty(out, n_groups, dtype=torch.float32, device=W.device)
    zeros = None if config.sym else torch.empty_like(scales)
    col_group = (perm if perm is not None else torch.arange(inp, device=W.device)) // gs  # static groups
    col_group = col_group.tolist()
    with _one_thread(W.device):
        _column_loop(W, Hinv, vals, scales, zeros, static, col_group, starts, qt, gs, config)

    if static is not None:
        for g, (sg, zg) in enumerate(static):
            scales[:, g] = sg
            if zeros is not None:
                zeros[:, g] = zg
    if config.scale_rounding == "pack":  # the loop quantized against the float32 scales
        scales = _stored_scale(scales, config.scale_dtype)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        vals = vals[:, invperm]
        if static is None and config.act_order:  # groups follow the processing order: record each column's group
            g_idx = (torch.arange(inp, device=W.device) // gs)[invperm].to(torch.int32)
    codes = (vals + qt.code_offset).to(torch.uint8)
    return QuantizedWeight.from_codes(codes, qt.name, (1, gs), scales, zeros, g_idx=g_idx)


def _for_format(config: GPTQConfig, fmt: str, explicit: set[str]) -> tuple[GPTQConfig, list[str]]:
    """Per-format defaults (``MethodSpec.extra["for_format"]``, applied by the plan check before any
    work): act-order saved as compressed-tensors uses static groups (columns in activation order,
    groups fixed in column order, no ``g_idx``: compressed-tensors' ``actorder: "weight"``, which
    compressed-tensors >= 0.20 and transformers load), unless ``static_groups`` was set explicitly.
    The ``g_idx`` variant goes to the gptq format, which holds it."""
    if fmt == "compressed-tensors" and config.act_order and not config.static_groups \
            and "static_groups" not in explicit:
        return config.replace(static_groups=True), [
            "act-order saved as compressed-tensors: static groups (actorder 'weight': columns in activation "
            "order, groups in column order, no g_idx; compressed-tensors >= 0.20 and transformers load it). "
            "The g_idx variant: --format gptq, or --opt static_groups=false with "
            "POLYQUANT_CT_ACTORDER_GROUP=1 (vLLM / compressed-tensors < 0.20 only)"]
    return config, []


register_method(MethodSpec(
    name="gptq",
    config_cls=GPTQConfig,
    quantize_weight=gptq_quantize,
    needs_calibration=True,
    family="calibration-based",
    bits=GPTQ_BITS,
    formats=("gptq", "compressed-tensors"),
    description="Hessian-aware column-by-column rounding with error feedback (optional act-order)",
    reference="Frantar et al. 2022, GPTQ (arXiv 2210.17323); IST-DASLab/gptq, AutoGPTQ",
    collect="hessian",
    extra={"for_format": _for_format},
    order=20,
    presets=(Preset("gptq-w4-g64", {"bits": 4, "group_size": 64}),),
    priors=(Prior(8, None, None, rel(14.041), "assumed: as RTN int8 per-row absmax (" + BENCH + ": pq-torchao-int8 14.041)"),
            Prior(4, None, None, rel(16.245), BENCH + ": GPTQ W4 g64 sym, exact fp32 calibration, 32 x 512: 16.245")),
))
