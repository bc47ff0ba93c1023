"""SpQR (Dettmers et al. 2023, arXiv 2306.03078): GPTQ over tiny groups whose statistics are
quantized again, with the weights that quantize worst kept as 16-bit sparse outliers.

The algorithm follows the reference (Vahe1994/SpQR ``spqr_engine.py``, ``quant_groups.py``):

* the Hessian ``H = 2/n sum x x^T`` of the layer's inputs; optional act-order permutation
  (columns by decreasing ``diag(H)``: ``permutation_order=act_order``); dead inputs zeroed;
  dampening ``damp_percent * mean(diag H)`` (the README's ``--percdamp 1e0`` is the default);
  the upper Cholesky factor ``U`` of ``H^-1`` drives a GPTQ loop in blocks of ``block_size``
  columns (lazy batch updates);
* at each group start (every ``group_size`` = 16 columns, processing order) a per-row min/max
  quantizer is fitted on the current, error-updated weights of the group (asymmetric,
  ``scale = (max - min) / maxq``, unrounded ``zero = -min / scale``; ``min == max`` -> [-1, 1]).
  With outlier detection on, the weights whose *leave-one-out* gain exceeds the threshold are
  first replaced by the mean of the row's other weights of the group, so they do not stretch
  the range: the gain of dropping weight ``j`` is the group's Hessian-weighted squared error
  ``sum ((q(w) - w) / U_kk)^2`` minus the same error of the other weights under a quantizer
  fitted without ``j``;
* second order: the group's ``out`` scales (and zeros), in runs of ``qq_groupsize`` = 16 rows,
  are quantized again with ``qq_scale_bits`` / ``qq_zero_bits`` (3) by the same min/max rule;
* per column, weights whose error ``((w - q(w)) / U_kk)^2`` exceeds ``outlier_threshold *
  mean_k(var_rows(W[:, k]) / U_kk^2)`` become outliers; the error of the column is then spread
  onto the later columns as in GPTQ.

Where polyquant departs from the reference, on purpose:

* the second-order statistics are rounded to float16 *before* the first-order scale and zero are
  quantized with them, and the scale and zero are decoded exactly as ``spqr_quant``'s kernels
  decode them (float16 arithmetic: ``s = fp16(ss * fp16(q_s - sz))``), so the codes are chosen
  against the values a checkpoint holds; the reference quantizes with float32 statistics and
  casts them to float16 when saving;
* an outlier keeps its nearest dense code and stores the float16 *residual* ``w - dense(q)``
  (the sparse matrix is added to the dense part: ``W = dequant(dense) + S``, as the CUDA kernel
  computes). The reference stores the weight itself and the dense code of 0, whose decoded value
  ``s * (round(z) - z)`` is then added on top (an error of up to ``s / 2`` per outlier);
  GPTQ's error feedback uses the decoded value (dense + float16 residual);
* a second-order run of (nearly) equal values gets a grid step of ``max|v| / 2048`` (the float16
  zero ``-min / step`` stays finite, equal values decode to themselves); the reference's min/max rule
  overflows float16 there or, for equal values, falls back to [-1, 1].

Result (``QuantizedWeight``): qtype ``uint{bits}``, ``block = (1, group_size)``; ``scale`` and
``zero`` (float16 ``[out, G]``, ``G = ceil(in / group_size)``) are the decoded two-level
statistics; with act-order ``g_idx`` maps each input column to its group. The stored encoding is
in ``extras`` (``QuantizedWeight.derived_fields``: ``scale``, ``zero`` and ``g_idx`` are decoded
from it, so only the encoding counts as stored bytes):

==================  ==============================  ==============================================
extra               shape / dtype                   meaning
==================  ==============================  ==============================================
``qq_scale_codes``  int32 ``[out, ceil(G*bs/32)]``  the first-order scale codes (``bs`` =
                                                    qq_scale_bits), packed LSB-first along ``G``
``qq_zero_codes``   int32 ``[out, ceil(G*bz/32)]``  the first-order zero codes, the same way
``qq_stats``        float16 ``[ceil(out/qg), G, 4]`` per run of ``qg`` = qq_groupsize rows and
                                                    group: (scale of scales, zero of scales, scale
                                                    of zeros, zero of zeros)
``qq_meta``         int32 ``[3]``                   (qq_scale_bits, qq_zero_bits, qq_groupsize)
``in_perm``         int16/int32 ``[in]``            act-order only: the processing order (input
                                                    column at each position)
==================  ==============================  ==============================================

``scale[r, g] = fp16(ss * fp16(q_s - sz))``, ``zero[r, g] = fp16(zs * fp16(q_z - zz))`` with the
record of row run ``r // qg``; ``w = (q - zero) * scale`` plus the outliers
(:class:`~polyquant.tensor.sparse.SparseOutliers`, float16 values; always attached, possibly
empty, so that kernels without sparse support do not take SpQR layers).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from polyquant.methods._hessian import hessian_inputs, zero_dead_inputs
from polyquant.methods.base import MethodConfig, check_int
from polyquant.methods.gptq import _inverse_hessian_upper, _one_thread
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.packing import pack, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight
from polyquant.tensor.sparse import SparseOutliers

__all__ = ["SpQRConfig", "spqr_quantize", "decode_two_level", "two_level_encode", "leave_one_out_gain",
           "minmax_params", "spqr_stats", "outlier_fraction", "SPQR_BITS"]

log = logging.getLogger(__name__)

SPQR_BITS = (2, 3, 4)
_EPS = 1e-9  # the reference's clamp of a scale before dividing by it
_Z2_MAX = 2048.0  # largest |zero| of a second-order grid (float16 keeps it exact enough)


@dataclass
class SpQRConfig(MethodConfig):
    """SpQR.

    Attributes:
        bits: 2, 3 or 4 (weight codes; the transformers / ``spqr_quant`` layout holds 3).
        group_size: input columns per first-order scale and zero (16; ``beta2`` of the format).
        qq_scale_bits / qq_zero_bits: bits of the second-order quantization of the scales / zeros.
        qq_groupsize: output rows per second-order statistic (16; ``beta1`` of the format).
        outlier_threshold: relative threshold of the outlier criterion (the reference's
            ``outlier_relative_threshold``; 0.2 in its README); ``inf`` disables outliers.
        act_order: process columns by decreasing ``diag(H)`` (``permutation_order=act_order``).
        damp_percent: dampening as a fraction of the mean Hessian diagonal (``percdamp``, 1.0).
        block_size: columns per lazy-update block (a multiple of ``group_size``).
        simplified_outliers: fit the group statistics on all weights (no leave-one-out pass).
        true_sequential: quantize a block's Linears group by group (as GPTQ).
    """

    bits: int = 3
    group_size: int = 16
    qq_scale_bits: int = 3
    qq_zero_bits: int = 3
    qq_groupsize: int = 16
    outlier_threshold: float = 0.2
    act_order: bool = True
    damp_percent: float = 1.0
    block_size: int = 128
    simplified_outliers: bool = False
    true_sequential: bool = True

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SPQR_BITS:
            raise ValueError(f"bits must be one of {list(SPQR_BITS)}, got {self.bits!r}")
        check_int("group_size", self.group_size, 2, 4096)
        check_int("qq_scale_bits", self.qq_scale_bits, 1, 8)
        check_int("qq_zero_bits", self.qq_zero_bits, 1, 8)
        check_int("qq_groupsize", self.qq_groupsize, 1, 4096)
        check_int("block_size", self.block_size, 1, 1 << 16)
        if self.block_size % self.group_size:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of group_size ({self.group_size}): "
                             "a group's statistics are fitted on weights updated inside one block")
        t = self.outlier_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t <= 0:
            raise ValueError(f"outlier_threshold must be a positive number (inf: no outliers), got {t!r}")
        d = self.damp_percent
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d < 1e3):
            raise ValueError(f"damp_percent must be a positive number below 1000, got {d!r}")
        for name in ("act_order", "simplified_outliers", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def describe(self) -> str:
        o = "no-outliers" if math.isinf(self.outlier_threshold) else f"ol{self.outlier_threshold:g}"
        return (f"spqr w{self.bits} g{self.group_size} qq{self.qq_scale_bits}/{self.qq_zero_bits}"
                f"x{self.qq_groupsize} {o}{' act-order' if self.act_order else ''}")


# -- min/max quantizers (the reference's Quantizer with perchannel, asym, unrounded zero) ----------
def minmax_params(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unrounded zero of an asymmetric ``maxq``-level grid over the last dim of ``x``
    (keepdim): ``scale = (max - min) / maxq``, ``zero = -min / scale``; ``min == max`` uses [-1, 1]."""
    return _grid(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), maxq)


def _grid(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`minmax_params` from the range ``[lo, hi]`` itself."""
    flat = lo == hi
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    scale = (hi - lo) / maxq
    return scale, -lo / scale


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale.clamp_min(_EPS) + zero), 0, maxq)


def _fake(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (_codes(x, scale, zero, maxq) - zero)


# -- second order ---------------------------------------------------------------------------------
def decode_two_level(codes: torch.Tensor, s2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``fp16(s2 * fp16(codes - z2))`` in float16 arithmetic (``spqr_quant``'s ``dequantize`` of a
    first-order statistic); ``codes`` any int/float tensor, ``s2`` / ``z2`` broadcastable float16."""
    return s2.to(torch.float16) * (codes.to(torch.float16) - z2.to(torch.float16))


def two_level_encode(v: torch.Tensor, bits: int, group: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the vector ``v [out]`` in runs of ``group`` entries with a ``bits``-bit min/max grid
    whose scale and zero are float16. Returns ``(codes uint8 [out], s2 fp16 [R], z2 fp16 [R],
    decoded float32 [out])`` (``R = ceil(out / group)``; a shorter last run is fitted on its own
    entries)."""
    out = v.numel()
    runs = -(-out // group)
    pad = runs * group - out
    vv = v.float()
    if pad:  # the last run padded with its last value: its min/max do not change
        vv = torch.cat([vv, vv[-1:].expand(pad)])
    g = vv.view(runs, group)
    maxq = (1 << bits) - 1
    s2, z2 = minmax_params(g, maxq)
    # a run of nearly equal values: keep the float16 zero -min/s2 finite (|zero| <= 2048: a grid step of
    # 1/2048 of the values); a run of equal values gets the same grid and decodes to itself (the
    # reference's [-1, 1] would decode 16 equal scales of 0.5 as 0.43)
    big = g.abs().amax(-1, keepdim=True)
    lo = g.amin(-1, keepdim=True)
    wide = (s2 < big / _Z2_MAX) | (lo == g.amax(-1, keepdim=True))
    if bool(wide.any()):
        s2 = torch.where(wide, torch.where(big > 0, big / _Z2_MAX, torch.ones_like(big)), s2)
        z2 = torch.where(wide, -lo / s2, z2)
    s2h, z2h = s2.to(torch.float16), z2.to(torch.float16)
    s2h = torch.where(s2h > 0, s2h, torch.full_like(s2h, 2.0 ** -24))  # an underflowed scale stays positive
    q = _codes(g, s2h.float(), z2h.float(), maxq)
    dec = decode_two_level(q, s2h, z2h).float()
    return q.to(torch.uint8).reshape(-1)[:out], s2h[:, 0], z2h[:, 0], dec.reshape(-1)[:out]


# -- leave-one-out outlier gain -------------------------------------------------------------------
def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, maxq: int) -> torch.Tensor:
    """For a group ``w [out, g]`` (``g >= 2``) with Hessian factors ``d [g]`` (``U_kk``): for each
    weight, how much the group's weighted squared error ``sum ((q(w) - w) / d)^2`` drops when that
    weight is left out (not quantized) and the quantizer is fitted on the others. ``[out, g]``.

    The others' min/max grid is the group's own unless the weight left out is the row's minimum or
    maximum, so the gain of every other weight is its own error term, and the two extreme positions
    take the grid of the row without them (second smallest / second largest value): three ``[out, g]``
    error evaluations instead of the ``[out, g, g - 1]`` of fitting every leave-one-out grid."""
    out, g = w.shape
    if g < 2:
        raise ValueError(f"a leave-one-out gain needs groups of at least 2 weights, got {g}")
    lo2 = w.topk(2, dim=-1, largest=False).values  # smallest, second smallest (equal when tied)
    hi2 = w.topk(2, dim=-1).values
    lo, hi = lo2[:, :1], hi2[:, :1]

    def err(s, z):
        return ((_fake(w, s, z, maxq) - w) / d).square()

    e = err(*_grid(lo, hi, maxq))
    gain = e  # not an extreme: the others keep the group's grid, and leaving the weight out drops its term
    base = e.sum(-1, keepdim=True)
    for is_j, grid in ((w == hi, (lo, hi2[:, 1:])), (w == lo, (lo2[:, 1:], hi))):
        ea = err(*_grid(*grid, maxq))
        gain = torch.where(is_j, base - (ea.sum(-1, keepdim=True) - ea), gain)
    return gain


# -- the algorithm --------------------------------------------------------------------------------
def spqr_quantize(weight: torch.Tensor, config: SpQRConfig, stats: dict | None) -> QuantizedWeight:
    """SpQR of one ``[out, in]`` weight with ``stats = {"H": [in, in] Hessian, "n": samples}``
    (``stats`` is not modified)."""
    W, H = hessian_inputs(weight, stats, "SpQR")
    out, inp = W.shape
    perm = torch.argsort(torch.diagonal(H), descending=True) if config.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm]
        H = H[:, perm]  # two statements: the unpermuted copy is freed before the second
    zero_dead_inputs(W, H)
    U = _inverse_hessian_upper(H, float(config.damp_percent))
    del H
    with _one_thread(W.device):
        res = _column_loop(W, U, config)
    codes, scale, zero, qs, qz, rec, omask, ovals = res
    g_idx = None
    extras: dict[str, torch.Tensor] = {
        "qq_scale_codes": pack(qs, config.qq_scale_bits, dim=-1),
        "qq_zero_codes": pack(qz, config.qq_zero_bits, dim=-1),
        "qq_stats": rec,
        "qq_meta": torch.tensor([config.qq_scale_bits, config.qq_zero_bits, config.qq_groupsize], dtype=torch.int32),
    }
    gs = config.group_size
    if perm is not None:
        inv = torch.argsort(perm)
        codes, omask, ovals = codes[:, inv], omask[:, inv], ovals[:, inv]
        g_idx = (inv // gs).to(torch.int32)
        extras["in_perm"] = perm.to(torch.int16 if inp <= 32767 else torch.int32)
    qw = QuantizedWeight.from_codes(codes.to(torch.uint8), f"uint{config.bits}", (1, gs), scale, zero,
                                    g_idx=g_idx, extras=extras)
    qw.outliers = SparseOutliers.from_dense_mask(ovals, omask, torch.float16)
    log.debug("spqr %s: %.3f%% outliers", tuple(weight.shape), 100 * qw.outliers.fraction)
    return qw


def _column_loop(W: torch.Tensor, U: torch.Tensor, cfg: SpQRConfig):
    """GPTQ's blocked loop with SpQR's group statistics and outliers, in processing order.
    Returns codes [out, in], scale / zero fp16 [out, G], first-order codes [out, G] (scale, zero),
    the second-order record fp16 [R, G, 4], the outlier mask and float16 residuals [out, in].

    As GPTQ's loop, it works on the transposed weight (an input column is a contiguous row), so the
    error updates inside a block are contiguous ``addr_`` calls."""
    out, inp = W.shape
    gs, qg = cfg.group_size, cfg.qq_groupsize
    maxq = (1 << cfg.bits) - 1
    G = -(-inp // gs)
    R = -(-out // qg)
    diag = torch.diagonal(U).clone()
    use_outliers = not math.isinf(float(cfg.outlier_threshold))
    # the reference's scale of the outlier criterion: mean over columns of var_rows(W) / U_kk^2
    thr = float(cfg.outlier_threshold) * float((W.var(dim=0) / diag.square()).mean()) if use_outliers else math.inf
    Wt = W.t().contiguous()  # [in, out]
    codes = torch.zeros(inp, out, dtype=torch.uint8, device=W.device)
    scale = torch.empty(out, G, dtype=torch.float16, device=W.device)
    zero = torch.empty_like(scale)
    qs = torch.empty(out, G, dtype=torch.uint8, device=W.device)
    qz = torch.empty_like(qs)
    rec = torch.empty(R, G, 4, dtype=torch.float16, device=W.device)
    omask = torch.zeros(inp, out, dtype=torch.bool, device=W.device)
    ovals = torch.zeros(inp, out, dtype=torch.float32, device=W.device)
    B = int(cfg.block_size)
    s = z = None
    for b1 in range(0, inp, B):
        b2 = min(b1 + B, inp)
        Err = torch.zeros(b2 - b1, out, dtype=W.dtype, device=W.device)
        for c in range(b1, b2):
            if c % gs == 0:  # a group starts: fit its statistics on the current (updated) weights
                g = c // gs
                gw = Wt[c:min(c + gs, inp)].t()  # [out, group]
                if use_outliers and not cfg.simplified_outliers and gw.shape[1] > 1:
                    likely = leave_one_out_gain(gw, diag[c:c + gw.shape[1]], maxq) > thr
                    keep = (~likely).to(gw.dtype)
                    mean = (gw * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                    gw = torch.where(likely, mean, gw)
                s1, z1 = minmax_params(gw, maxq)
                qs[:, g], ss, sz, sdec = two_level_encode(s1[:, 0], cfg.qq_scale_bits, qg)
                qz[:, g], zs, zz, zdec = two_level_encode(z1[:, 0], cfg.qq_zero_bits, qg)
                rec[:, g] = torch.stack([ss, sz, zs, zz], dim=1)
                scale[:, g], zero[:, g] = sdec.to(torch.float16), zdec.to(torch.float16)
                s, z = sdec, zdec
            w = Wt[c]
            q = _codes(w, s, z, maxq)
            deq = s * (q - z)
            d = U[c, c]
            err = (w - deq) / d
            if use_outliers:
                is_out = err.square() > thr
                if bool(is_out.any()):
                    resid = (w - deq).to(torch.float16)
                    ovals[c] = torch.where(is_out, resid.float(), 0.0)
                    omask[c] = is_out
                    deq = torch.where(is_out, deq + resid.float(), deq)
                    err = (w - deq) / d
            codes[c] = q.to(torch.uint8)
            Wt[c] = deq
            if c + 1 < b2:
                Wt[c + 1:b2].addr_(U[c, c + 1:b2], err, alpha=-1)
            Err[c - b1] = err
        if b2 < inp:
            Wt[b2:].addmm_(U[b1:b2, b2:].t(), Err, alpha=-1)
    return codes.t().contiguous(), scale, zero, qs, qz, rec, omask.t().contiguous(), ovals.t().contiguous()


# -- reading the encoding back ------------------------------------------------------------------------
def spqr_stats(qw: QuantizedWeight) -> dict[str, torch.Tensor | int]:
    """The two-level encoding of a SpQR weight, unpacked: ``qs`` / ``qz`` uint8 ``[out, G]``, ``rec``
    float16 ``[R, G, 4]``, ``scale_bits``, ``zero_bits``, ``qq_groupsize``, ``perm`` (int64 or None).
    ValueError when ``qw`` does not carry one."""
    ex = qw.extras
    for k in ("qq_scale_codes", "qq_zero_codes", "qq_stats", "qq_meta"):
        if k not in ex:
            raise ValueError(f"not a SpQR weight: extras has no {k!r}")
    sb, zb, qg = (int(v) for v in ex["qq_meta"].tolist())
    G = qw.scale.shape[1]
    perm = ex.get("in_perm")
    return {"qs": unpack(ex["qq_scale_codes"], sb, G, dim=-1), "qz": unpack(ex["qq_zero_codes"], zb, G, dim=-1),
            "rec": ex["qq_stats"], "scale_bits": sb, "zero_bits": zb, "qq_groupsize": qg,
            "perm": None if perm is None else perm.long() & (0xFFFF if perm.dtype == torch.int16 else -1)}


def decode_stats(qs: torch.Tensor, qz: torch.Tensor, rec: torch.Tensor, qq_groupsize: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order ``(scale, zero)`` float16 ``[out, G]`` from their codes and the record."""
    out = qs.shape[0]
    r = torch.arange(out, device=qs.device) // qq_groupsize
    rr = rec.to(torch.float16)[r]  # [out, G, 4]
    return (decode_two_level(qs, rr[..., 0], rr[..., 1]), decode_two_level(qz, rr[..., 2], rr[..., 3]))


def outlier_fraction(qw: QuantizedWeight) -> float:
    return 0.0 if qw.outliers is None else qw.outliers.fraction


register_method(MethodSpec(
    name="spqr",
    config_cls=SpQRConfig,
    quantize_weight=spqr_quantize,
    needs_calibration=True,
    family="calibration-based",
    bits=SPQR_BITS,
    formats=("spqr", "polyquant-spqr"),
    description="GPTQ over groups of 16 with 3-bit quantized statistics and fp16 sparse outliers",
    reference="Dettmers et al. 2023, SpQR (arXiv 2306.03078); Vahe1994/SpQR",
    collect="hessian",
    order=25,
    presets=(Preset("spqr-w3", {}),),
    priors=(Prior(3, None, None, rel(16.079), "measured: " + BENCH + ", SpQR section: w3 g16, threshold 0.2, 4.31 bits "
                  "per weight counted, 32 x 512 pydoc calibration"),
            Prior(2, None, None, rel(39.463), "measured: " + BENCH + ", SpQR section: w2 g16 at threshold 1.0 (3.08 bits "
                  "counted; the default threshold 0.2 keeps ~10 % outliers at 2 bits, ~6 bits per weight)")),
))
