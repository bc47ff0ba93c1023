"""AQLM (Egiazarian et al. 2024, additive quantization of language models) on a CPU.

Each vector of ``out_group_size x in_group_size`` weights (default 1 x 8: eight consecutive inputs of
one output row) is replaced by the sum of ``num_codebooks`` code words, one from each learned code
book of ``2**nbits_per_codebook`` entries, times one scale per output group:
``W[o-group, i-group] = scale[o] * sum_m codebooks[m, codes[o, i, m]]`` (the layout of
``QuantizedWeight``'s ``vector`` family and of AQLM checkpoints).

The objective is the layer's output error on the calibration data, ``tr((W - Q) H (W - Q)^T)`` with
the input Hessian ``H = 2/n X X^T`` the sequential driver collects (X is never materialised). Per Linear:

1. **Initialisation**: residual k-means over the weight's vectors (scale-normalised), code book 1 fitting
   the weights, code book 2 what is left, ...; the distance of a vector of input group ``i`` of row
   ``o`` is weighted by ``scale[o]^2 * diag(H)[i-group]`` (the diagonal of the objective) - the
   "Hessian-weighted" initialisation: unweighted greedy k-means is what collapses small models at
   2 bits (arXiv 2604.08118). ``init_points_per_centroid`` subsamples the fit (AQLM's
   ``--init_max_points_per_centroid``); every vector is then assigned.
2. **Alternation** until the relative improvement of the objective falls below
   ``relative_tolerance`` (or ``max_iters``):

   - codes: beam search (``beam_size``; 1 = AQLM's default, a coordinate descent) over each input
     group's codes, all output rows at once, the others fixed. With ``G = (W - Q) H`` kept up to date,
     a group's cost is the quadratic form ``-2 x.(g + H_ii x0) + x^T H_ii x`` of its new reconstruction
     ``x``; for one code book's candidates it is one ``[rows, d] @ [d, K]`` product plus the precomputed
     code word terms ``c^T H_ii c``. A step never increases the objective (the current code is a candidate).
   - code books: the least-squares solution for fixed codes and scales, by a few Jacobi-preconditioned
     conjugate-gradient steps on the exact normal equations (each step: a gather, one ``[out, in] @ H``
     and a scatter-add; AQLM itself takes Adam steps here);
   - scales: per output group, the closed form ``<q, w>_H / <q, q>_H``.

   Code books and scales are kept at float16 values (what the checkpoint stores) as they are updated,
   and the codes come last, so the stored weight is the one the objective measured.

Block fine-tuning (the paper's step after each block, ``finetune_epochs > 0``): once a block's Linears are
quantized, their code books and scales (codes fixed) are trained by Adam so that the quantized block,
fed the inputs the quantized model gives it, reproduces the float block's outputs on the same inputs
(:mod:`polyquant.calibration.tune`; the driver's ``block_tuner`` hook). Code books and scales are
rounded to float16 again at the end.

Stored size (``QuantizedWeight.nbytes``): codes ``M * nbits / in_group_size`` bits per weight plus the
code books ``M * 2**nbits * og * ig * 16`` bits per layer plus 16 bits per output group. For 2x8 on a
576 x 576 layer that is 2 + 0.198 + 0.028 bits; **1x16 stores a 65536 x 8 float16 code book (1 MiB) per
layer, more than the codes of a 576-wide layer** (1x16 is about 27 bits per weight on q_proj of
SmolLM2-135M), so it only pays on wide models.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.calibration.tune import TuneJob, TuneSettings, fit_block
from polyquant.methods._hessian import hessian_inputs, zero_dead_inputs
from polyquant.methods.base import MethodConfig, check_fraction, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.tensor.quantized_weight import QuantizedWeight, vector_weight

__all__ = ["AQLMConfig", "aqlm_quantize", "aqlm_fit", "AQLMState", "weighted_kmeans", "SCHEMES", "TrainableAQLM",
           "aqlm_block_tuner"]

log = logging.getLogger(__name__)

#: named schemes (num_codebooks, nbits_per_codebook) with their nominal code bits per weight at in_group_size 8
SCHEMES = {"1x16": (1, 16), "2x8": (2, 8), "1x8": (1, 8), "4x8": (4, 8), "8x8": (8, 8)}
_CHUNK = 1 << 22  # elements of a [rows, candidates] cost block


@dataclass
class AQLMConfig(MethodConfig):
    """AQLM.

    Attributes:
        num_codebooks: code books summed per vector (M).
        nbits_per_codebook: bits per code (each code book has ``2**nbits`` entries), 1..16.
        in_group_size: consecutive inputs per vector; must divide in_features.
        out_group_size: output rows per vector (one scale per output group); must divide out_features.
        beam_size: hypotheses kept per vector in the code search (1: greedy coordinate descent).
        max_iters: alternations (codes, code books, scales) at most.
        relative_tolerance: stop when the objective improves by less than this fraction.
        init_iters: k-means iterations per code book at initialisation.
        init_points_per_centroid: vectors sampled per centroid for the k-means fit (0: all).
        codebook_steps: conjugate-gradient steps of each code book update.
        true_sequential: quantize a block's Linears group by group (driver option).
        seed: k-means seeding (and the sample order of the block fine-tuning).
        finetune_epochs: block fine-tuning epochs over the calibration samples (0: none).
        finetune_lr: its Adam learning rate.
        finetune_batch: calibration samples per Adam step.
        finetune_tolerance: stop when an epoch improves the block's output error by less than this fraction.
    """

    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    out_group_size: int = 1
    beam_size: int = 1
    max_iters: int = 4
    relative_tolerance: float = 1e-3
    init_iters: int = 12
    init_points_per_centroid: int = 64
    codebook_steps: int = 4
    true_sequential: bool = True
    seed: int = 0
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    finetune_batch: int = 4
    finetune_tolerance: float = 1e-3

    def validate(self) -> None:
        check_int("num_codebooks", self.num_codebooks, 1, 64)
        check_int("finetune_epochs", self.finetune_epochs, 0, 100000)
        check_int("finetune_batch", self.finetune_batch, 1, 1 << 20)
        check_fraction("finetune_lr", self.finetune_lr, zero=False)
        check_fraction("finetune_tolerance", self.finetune_tolerance)
        check_int("nbits_per_codebook", self.nbits_per_codebook, 1, 16)
        check_int("in_group_size", self.in_group_size, 1, 256)
        check_int("out_group_size", self.out_group_size, 1, 256)
        check_int("beam_size", self.beam_size, 1, 64)
        check_int("max_iters", self.max_iters, 0, 10000)
        check_int("init_iters", self.init_iters, 0, 10000)
        check_int("init_points_per_centroid", self.init_points_per_centroid, 0, 1 << 20)
        check_int("codebook_steps", self.codebook_steps, 0, 10000)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.true_sequential, bool):
            raise ValueError(f"true_sequential must be a bool, got {self.true_sequential!r}")
        check_fraction("relative_tolerance", self.relative_tolerance)

    @property
    def code_bits(self) -> float:
        """Nominal code bits per weight (code books and scales not counted)."""
        return self.num_codebooks * self.nbits_per_codebook / (self.in_group_size * self.out_group_size)

    def describe(self) -> str:
        g = f"g{self.in_group_size}" + (f"x{self.out_group_size}" if self.out_group_size != 1 else "")
        beam = f" beam{self.beam_size}" if self.beam_size != 1 else ""
        return f"aqlm {self.num_codebooks}x{self.nbits_per_codebook} {g}{beam}"


# -- weighted k-means ----------------------------------------------------------------------------

def _nearest(x: torch.Tensor, wt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and weighted squared distance ``sum_j wt_j (x_j - c_j)^2`` of the nearest centroid."""
    n = x.shape[0]
    k = c.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK // max(1, k))
    ct, c2t = c.t(), (c * c).t()
    for a in range(0, n, step):
        xs, ws = x[a:a + step], wt[a:a + step]
        d = (ws * xs * xs).sum(1, keepdim=True)
        d = torch.addmm(d, ws * xs, ct, alpha=-2).addmm_(ws, c2t)
        v, i = d.min(1)
        idx[a:a + step], dist[a:a + step] = i, v.clamp_min_(0)
    return idx, dist


def weighted_kmeans(x: torch.Tensor, wt: torch.Tensor, k: int, iters: int, gen: torch.Generator,
                    max_points: int = 0, trace: Callable[[str, float], None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``x [n, d]`` under per-coordinate weights ``wt [n, d] >= 0``: the distance of a point
    to a centroid is ``sum_j wt_j (x_j - c_j)^2``; a centroid is the weighted mean of its points per
    coordinate. Fit on at most ``max_points`` sampled points (0: all), then every point is assigned.
    Returns centroids ``[k, d]`` and the codes ``[n]``. ``trace(step, objective)`` is called after every
    assignment and every update (the weighted objective on the fitted points, never increasing)."""
    n, d = x.shape
    if max_points and n > max_points:
        sel = torch.randperm(n, generator=gen, device="cpu")[:max_points].to(x.device)
        xf, wf = x[sel], wt[sel]
    else:
        xf, wf = x, wt
    nf = xf.shape[0]
    pick = torch.randperm(nf, generator=gen, device="cpu")[:min(k, nf)].to(x.device)
    c = xf[pick].clone()
    if c.shape[0] < k:  # fewer points than centroids: the rest are copies (never used by an assignment)
        c = torch.cat([c, c[torch.randint(c.shape[0], (k - c.shape[0],), generator=gen).to(x.device)]])
    for _ in range(iters):
        idx, dist = _nearest(xf, wf, c)
        if trace is not None:
            trace("assign", float(dist.double().sum()))
        num = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, idx, wf * xf)
        den = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, idx, wf)
        # a coordinate no point of the cluster weighs keeps its value (the objective ignores it)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        empty = torch.bincount(idx, minlength=k) == 0
        if trace is not None:
            trace("update", float(((xf - c[idx]) ** 2 * wf).double().sum()))
        if bool(empty.any()):  # re-seed empty clusters at the worst-fitted points (for the next pass)
            ne = int(empty.sum())
            far = torch.topk(dist, min(ne, nf)).indices
            c[torch.nonzero(empty).flatten()[:far.numel()]] = xf[far]
    idx, _ = _nearest(x, wt, c)
    return c, idx


def _sweep_available() -> bool:
    try:
        from polyquant.kernels.cpu_aqlm import sweep_available
    except ImportError:  # pragma: no cover
        return False
    return sweep_available()


# -- the alternating solver -----------------------------------------------------------------------

class AQLMState:
    """Codes, code books and scales of one weight against the objective ``tr(R H R^T)``, ``R = W - Q``.

    ``codes [ob, G, M]`` int64, ``cb [M, K, d]`` (d = og * ig), ``s [ob]``; ``R`` and ``G = R H`` are kept
    consistent by every update; :meth:`objective` is ``sum(R * G)``."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, og: int, ig: int, codes: torch.Tensor,
                 cb: torch.Tensor, s: torch.Tensor) -> None:
        self.W, self.H, self.og, self.ig = W, H, og, ig
        self.out, self.inp = W.shape
        self.ob, self.ng = self.out // og, self.inp // ig
        self.d = og * ig
        self.codes, self.cb, self.s = codes, cb, s
        self.M, self.K = cb.shape[0], cb.shape[1]
        self.offsets = torch.arange(self.M, device=W.device) * self.K
        self.WH = W @ H
        self.refresh()

    # layout helpers: [out, in] <-> vectors [ob, G, d]
    def to_vec(self, A: torch.Tensor) -> torch.Tensor:
        return A.reshape(self.ob, self.og, self.ng, self.ig).permute(0, 2, 1, 3).reshape(self.ob, self.ng, self.d)

    def from_vec(self, V: torch.Tensor) -> torch.Tensor:
        return V.reshape(self.ob, self.ng, self.og, self.ig).permute(0, 2, 1, 3).reshape(self.out, self.inp)

    def unscaled(self, cb: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_m cb[m, codes[..., m]]`` as vectors ``[ob, G, d]``."""
        cb = self.cb if cb is None else cb
        flat = cb.reshape(self.M * self.K, self.d)
        return flat[(self.codes + self.offsets).reshape(-1)].view(self.ob, self.ng, self.M, self.d).sum(2)

    def reconstruction(self) -> torch.Tensor:
        return self.from_vec(self.unscaled() * self.s.view(-1, 1, 1))

    def refresh(self) -> None:
        self.R = self.W - self.reconstruction()
        self.G = self.R @ self.H

    def objective(self) -> float:
        return float((self.R * self.G).double().sum())

    # -- codes: beam search, one input group at a time, every output group at once --
    def code_sweep(self, beam: int, trace: Callable[[str, float], None] | None = None,
                   compiled: bool | None = None) -> int | None:
        """One pass over every input group (``compiled``: the C pass of ``kernels/cpu_aqlm.py`` for beam 1
        and out_group_size 1 on the CPU, when it builds; None = when available). Returns the codes
        changed (compiled pass) or None."""
        use_c = compiled
        if use_c is None:
            use_c = (trace is None and beam == 1 and self.og == 1 and self.W.device.type == "cpu"
                     and _sweep_available())
        if use_c:
            return self._compiled_sweep()
        for i in range(self.ng):
            self.search_group(i, beam)
            if trace is not None:
                trace("beam", self.objective())

    def _compiled_sweep(self) -> int:
        from polyquant.kernels.cpu_aqlm import aqlm_sweep
        ig, ng, M, K = self.ig, self.ng, self.M, self.K
        Hb = torch.diagonal(self.H.view(ng, ig, ng, ig), dim1=0, dim2=2).permute(2, 0, 1)  # [ng, ig, ig]
        cb = self.cb.contiguous()
        nb = torch.empty(ng, M, K, dtype=torch.float32)
        step = max(1, _CHUNK // (M * K * ig))
        for a in range(0, ng, step):
            hb = Hb[a:a + step]
            nb[a:a + step] = (torch.matmul(cb.unsqueeze(0), hb.unsqueeze(1)) * cb.unsqueeze(0)).sum(-1)
        codes = self.codes.to(torch.int32).contiguous()
        if not (self.R.is_contiguous() and self.G.is_contiguous()):
            self.R, self.G = self.R.contiguous(), self.G.contiguous()
        n = aqlm_sweep(self.H.contiguous(), self.G, self.R, codes, cb, nb, self.s.contiguous())
        self.codes = codes.to(torch.int64)
        return n

    def search_group(self, i: int, beam: int) -> None:
        og, ig, d, ob, M, K = self.og, self.ig, self.d, self.ob, self.M, self.K
        sl = slice(i * ig, (i + 1) * ig)
        Hii = self.H[sl, sl]
        s = self.s
        cur = self.codes[:, i, :]                                     # [ob, M]
        x0 = self.cb.reshape(M * K, d)[(cur + self.offsets).reshape(-1)].view(ob, M, d).sum(1) * s[:, None]
        g = self.G[:, sl].reshape(ob, d)
        b = g + (x0.view(ob, og, ig) @ Hii).view(ob, d)               # the group's linear term
        hyp = cur.unsqueeze(1)                                        # [ob, Bc, M]
        y = x0.unsqueeze(1)                                           # [ob, Bc, d]
        cost = None
        for m in range(M):
            C = self.cb[m]                                            # [K, d]
            nb = ((C.view(K, og, ig) @ Hii) * C.view(K, og, ig)).sum((1, 2))  # c^T H_ii c
            ym = y - s[:, None, None] * C[hyp[..., m]]
            Hym = (ym.view(ob, -1, og, ig) @ Hii).view(ob, -1, d)
            base = (ym * (Hym - 2 * b[:, None])).sum(-1)              # [ob, Bc]
            lin = (2 * s)[:, None, None] * (Hym - b[:, None])         # [ob, Bc, d]
            bc = ym.shape[1]
            step = max(1, _CHUNK // (bc * K))
            keep = min(beam, bc * K)
            vals = torch.empty(ob, keep, dtype=ym.dtype, device=ym.device)
            pos = torch.empty(ob, keep, dtype=torch.int64, device=ym.device)
            for a in range(0, ob, step):
                e = slice(a, a + step)
                tot = torch.matmul(lin[e], C.t()).add_(base[e, :, None]).add_((s[e] ** 2)[:, None, None] * nb)
                tot = tot.reshape(tot.shape[0], bc * K)
                if keep == 1:
                    v, p = tot.min(1, keepdim=True)
                else:
                    v, p = torch.topk(tot, keep, dim=1, largest=False)
                vals[e], pos[e] = v, p
            parent, code = pos // K, pos % K
            hyp = torch.gather(hyp, 1, parent[..., None].expand(-1, -1, M)).clone()
            hyp[..., m] = code
            y = torch.gather(ym, 1, parent[..., None].expand(-1, -1, d)) + s[:, None, None] * C[code]
            cost = vals
        best = 0 if cost is None else cost.argmin(1)
        new = hyp[torch.arange(ob, device=hyp.device), best] if cost is not None else cur
        xn = y[torch.arange(ob, device=y.device), best]
        self.codes[:, i, :] = new
        delta = (xn - x0).view(ob, og, ig).reshape(self.out, ig)      # change of Q on the group's columns
        self.R[:, sl] -= delta
        self.G.addmm_(delta, self.H[sl, :], alpha=-1)

    # -- code books: least squares by preconditioned conjugate gradient --
    def _adjoint(self, Y: torch.Tensor) -> torch.Tensor:
        """``A^T Y``: the gradient-shaped sum over the vectors using each code word."""
        Yv = (self.to_vec(Y) * self.s.view(-1, 1, 1)).reshape(-1, 1, self.d).expand(-1, self.M, -1)
        out = torch.zeros(self.M * self.K, self.d, dtype=Y.dtype, device=Y.device)
        out.index_add_(0, (self.codes + self.offsets).reshape(-1), Yv.reshape(-1, self.d))
        return out.view(self.M, self.K, self.d)

    def _apply(self, P: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self.from_vec(self.unscaled(P) * self.s.view(-1, 1, 1)) @ self.H)

    def update_codebooks(self, steps: int) -> None:
        if steps <= 0:
            return
        x = self.cb.clone()
        # Jacobi preconditioner: the operator's diagonal (code word usage weighted by s^2 diag(H))
        dvec = torch.diagonal(self.H).view(1, self.ng, 1, self.ig).expand(self.ob, -1, self.og, -1)
        dvec = dvec.reshape(self.ob, self.ng, self.d)
        diag = self._adjoint_plain(dvec * (self.s ** 2).view(-1, 1, 1))
        pinv = torch.where(diag > 0, 1.0 / diag.clamp_min(1e-30), torch.zeros_like(diag))
        r = self._adjoint(self.WH) - self._apply(x)
        z = r * pinv
        p = z.clone()
        rz = float((r * z).double().sum())
        for _ in range(steps):
            if rz <= 0:
                break
            Ap = self._apply(p)
            pAp = float((p * Ap).double().sum())
            if not pAp > 0:
                break
            alpha = rz / pAp
            x.add_(p, alpha=alpha)
            r.sub_(Ap, alpha=alpha)
            z = r * pinv
            rz_new = float((r * z).double().sum())
            p = z.add_(p, alpha=rz_new / rz)
            rz = rz_new
        self.cb = x.to(torch.float16).to(x.dtype)
        self.refresh()

    def _adjoint_plain(self, Vv: torch.Tensor) -> torch.Tensor:
        """Scatter-add vectors ``[ob, G, d]`` onto the code words they use (no scale)."""
        src = Vv.reshape(-1, 1, self.d).expand(-1, self.M, -1).reshape(-1, self.d)
        out = torch.zeros(self.M * self.K, self.d, dtype=Vv.dtype, device=Vv.device)
        out.index_add_(0, (self.codes + self.offsets).reshape(-1), src)
        return out.view(self.M, self.K, self.d)

    # -- scales: closed form per output group --
    def update_scales(self) -> None:
        Q = self.from_vec(self.unscaled())
        QH = Q @ self.H
        num = (QH * self.W).view(self.ob, -1).sum(1)
        den = (QH * Q).view(self.ob, -1).sum(1)
        s = torch.where(den > 0, num / den.clamp_min(1e-30), self.s)
        self.s = s.to(torch.float16).to(s.dtype)
        self.refresh()


def aqlm_fit(W: torch.Tensor, H: torch.Tensor, config: AQLMConfig,
             trace: Callable[[str, float], None] | None = None) -> tuple[AQLMState, dict]:
    """Run AQLM on one float32 weight ``[out, in]`` with its Hessian; returns the state and a summary
    (``objective``, ``relative_error``, ``iters``, seconds per phase). ``trace(phase, value)`` sees the
    k-means objective after each of its steps and the layer objective after each code group update."""
    og, ig = config.out_group_size, config.in_group_size
    out, inp = W.shape
    if inp % ig:
        raise ValueError(f"in_group_size {ig} does not divide in_features {inp}")
    if out % og:
        raise ValueError(f"out_group_size {og} does not divide out_features {out}")
    M, K = config.num_codebooks, 1 << config.nbits_per_codebook
    ob, ng, d = out // og, inp // ig, og * ig
    gen = torch.Generator().manual_seed(int(config.seed))
    t0 = time.perf_counter()
    # scale-normalised vectors and their diagonal weights
    s = W.reshape(ob, -1).pow(2).mean(1).sqrt().clamp_min(1e-8).to(torch.float16).float()
    Wn = W / s.repeat_interleave(og).view(-1, 1)
    vec = Wn.reshape(ob, og, ng, ig).permute(0, 2, 1, 3).reshape(ob * ng, d)
    dH = torch.diagonal(H).clamp_min(0).reshape(1, ng, 1, ig).expand(ob, ng, og, ig).reshape(ob * ng, d)
    wt = (dH * (s ** 2).repeat_interleave(ng).view(-1, 1)).contiguous()
    wt = wt / wt.mean().clamp_min(1e-30)
    resid = vec.clone()
    cbs, codes = [], []
    max_points = config.init_points_per_centroid * K if config.init_points_per_centroid else 0
    for _ in range(M):
        c, idx = weighted_kmeans(resid, wt, K, config.init_iters, gen, max_points,
                                 trace=(lambda st, v: trace("kmeans", v)) if trace is not None else None)
        c = c.to(torch.float16).float()
        resid -= c[idx]
        cbs.append(c)
        codes.append(idx)
    t_init = time.perf_counter() - t0
    state = AQLMState(W, H, og, ig, torch.stack(codes, 1).view(ob, ng, M), torch.stack(cbs), s)
    f0 = float((W * state.WH).double().sum())
    prev = state.objective()
    times = {"init": t_init, "codes": 0.0, "codebooks": 0.0, "scales": 0.0}
    it = 0
    t = time.perf_counter()
    state.update_scales()
    times["scales"] += time.perf_counter() - t
    for it in range(1, config.max_iters + 1):
        t = time.perf_counter()
        state.code_sweep(config.beam_size, trace)
        times["codes"] += time.perf_counter() - t
        cur = state.objective()
        done = prev <= 0 or (prev - cur) / prev < config.relative_tolerance
        prev = cur
        if done or it == config.max_iters:
            break
        t = time.perf_counter()
        state.update_codebooks(config.codebook_steps)
        times["codebooks"] += time.perf_counter() - t
        t = time.perf_counter()
        state.update_scales()
        times["scales"] += time.perf_counter() - t
    obj = state.objective()
    info = {"objective": obj, "relative_error": obj / f0 if f0 > 0 else 0.0, "iters": it,
            "seconds": {k: round(v, 3) for k, v in times.items()}}
    return state, info


def aqlm_quantize(weight: torch.Tensor, config: AQLMConfig, stats: dict | None) -> QuantizedWeight:
    """AQLM of one ``[out, in]`` weight with ``stats = {"H": [in, in] Hessian}`` (not modified)."""
    W, H = hessian_inputs(weight, stats, "AQLM", check_samples=False)
    out, inp = W.shape
    if inp % config.in_group_size:
        raise ValueError(f"in_group_size {config.in_group_size} does not divide in_features {inp}")
    if out % config.out_group_size:
        raise ValueError(f"out_group_size {config.out_group_size} does not divide out_features {out}")
    zero_dead_inputs(W, H)
    t0 = time.perf_counter()
    state, info = aqlm_fit(W, H, config)
    log.info("aqlm %s [%d, %d]: relative error %.4e after %d iterations in %.1f s %s", config.describe(), out, inp,
             info["relative_error"], info["iters"], time.perf_counter() - t0, info["seconds"])
    M, K, d = state.cb.shape
    cb = state.cb.view(M, K, config.out_group_size, config.in_group_size).to(torch.float16).contiguous()
    return QuantizedWeight.from_vector_codes(state.codes, cb, state.s.to(torch.float16))


# -- block fine-tuning ---------------------------------------------------------------------------
class TrainableAQLM(nn.Module):
    """A quantized AQLM Linear with its code books and scales as float32 parameters (codes fixed):
    ``forward`` builds ``scale[o] * sum_m codebooks[m, codes[o, i, m]]`` differentiably."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.shape = tuple(qw.shape)
        self.register_buffer("codes", qw.codes.long(), persistent=False)  # [ob, ib, m]
        self.codebooks = nn.Parameter(qw.codebooks.float().clone())
        self.scales = nn.Parameter(qw.scale.float().reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def weight(self) -> torch.Tensor:
        return vector_weight(self.codebooks, self.codes, self.scales, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def export(self) -> QuantizedWeight:
        """The tuned weight, code books and scales rounded to float16 (what the checkpoint stores)."""
        with torch.no_grad():
            return QuantizedWeight.from_vector_codes(self.codes, self.codebooks.to(torch.float16).contiguous(),
                                                     self.scales.to(torch.float16))


def aqlm_block_tuner(config: AQLMConfig):
    """The driver's ``block_tuner`` hook: None unless ``finetune_epochs`` > 0."""
    if config.finetune_epochs <= 0:
        return None
    settings = TuneSettings(epochs=config.finetune_epochs, lr=config.finetune_lr, batch=config.finetune_batch,
                            tolerance=config.finetune_tolerance, seed=config.seed)

    def tune(job: TuneJob) -> dict[str, QuantizedWeight]:
        mods = {name: TrainableAQLM(qw, job.linears[name].bias).to(job.linears[name].weight.device)
                for name, qw in job.qws.items()}
        res = fit_block(job, mods, settings)
        log.info("aqlm block %d fine-tuning: output error %.4e -> %.4e in %d epochs, %.1f s", job.index,
                 res.loss_before, res.loss_after, res.epochs, res.seconds)
        if res.loss_after >= res.loss_before:  # nothing gained: keep the untouched float16 values
            return dict(job.qws)
        return {name: m.export() for name, m in mods.items()}

    return tune


register_method(MethodSpec(
    name="aqlm",
    config_cls=AQLMConfig,
    quantize_weight=aqlm_quantize,
    needs_calibration=True,
    family="codebook",
    bits=(1, 2, 3, 4, 8),
    formats=("aqlm",),
    description="additive code books (M x nbits per 8-vector), Hessian-weighted k-means + beam search + "
                "least-squares code books",
    reference="Egiazarian et al. 2024, AQLM (arXiv 2401.06118); Vahe1994/AQLM",
    collect="hessian",
    block_tuner=aqlm_block_tuner,
    # compare's rows: 2x8 (about 2.2 bits per weight on SmolLM2-135M, code books counted) and 1x16 (the
    # paper's default; its 65536 x 8 fp16 code book per layer outweighs the codes of a 576-wide model)
    presets=(Preset("aqlm-2x8", {"num_codebooks": 2, "nbits_per_codebook": 8}, sweep=False),
             Preset("aqlm-1x16", {"num_codebooks": 1, "nbits_per_codebook": 16}, sweep=False)),
    # the advisor matches ``bits`` against the code index width (8 for Kx8, 16 for 1x16)
    priors=(Prior(8, None, None, rel(34.92), "measured, " + BENCH + ": AQLM 2x8 g8 as quantize makes it (128 x 512 "
                  "mix calibration, 2026-12-07): 34.92 (GPTQ W3 g64 in the same run 29.12); `polyquant finetune-aqlm` "
                  "(100 steps, 11 min at 2 threads) then brings it to 24.70, below GPTQ W3"),
            Prior(16, None, None, rel(34.92), "assumed: AQLM 1x16 as 2x8 in accuracy, but on a 576-wide model its "
                  "65536 x 8 fp16 code book per layer (1 MiB) costs more than the codes: about 27 bits per weight "
                  "on a 576 x 576 layer, so it never wins on size here (it pays on 4096-wide models: ~2.3 bits)")),
))
