"""AWQ (Lin et al. 2023, activation-aware weight quantization): per input channel scales ``s``
chosen from the calibration activations, folded into the module that feeds a group of Linears
(``W <- W diag(s)``, feed output ``<- / s``: the float model is unchanged), then a clipping search
on each group's weight range, then asymmetric round-to-nearest with integer zero points.

As in AutoAWQ (``awq/quantize/quantizer.py``) / llm-awq (``auto_scale.py``, ``auto_clip.py``):

- statistics: ``x_mean`` = mean ``|x|`` per input channel over the calibration tokens;
- groups sharing an input, from the architecture table (``calibration/arch.py``): q/k/v after the
  attention norm, gate/up after the MLP norm, v -> o when v's outputs map one to one onto o's
  inputs (not with grouped-query attention), up -> down. A group is scaled only when the table
  says the fold is exact (``Group.scalable``) and the feed is a norm (``weight`` [+ ``bias``];
  Gemma's ``1 + weight`` norms included) or a float Linear with matching rows; every Linear that
  reads the feed's output is scaled, quantized or not. Other groups get no scaling (logged);
- scale search: ``n_grid`` points ``alpha = i / n_grid``; ``s = x_mean^alpha`` (``duo_scaling``:
  ``x_mean^alpha / (w_mean^(1-alpha) + 1e-4)``, AutoAWQ's default), clamped to ``>= 1e-4``,
  normalized by ``sqrt(max(s) min(s))``; the loss of each candidate is the group's output error
  ``sum_j ||(Q(W_j diag(s)) diag(s)^-1 - W_j) X||^2``, the paper's objective (Eq. 4), computed
  exactly from ``H = X^T X`` as ``tr(D H D^T)`` instead of re-running the module on the tokens
  (AutoAWQ measures the error at the output of the whole attention / MLP module instead);
  the first strict minimum wins (alpha = 0 means no scaling);
- clipping search (skipped for Linears whose name contains one of ``clip_skip``, AutoAWQ's
  ``q_``/``k_``/``query``/``key``/``Wqkv``): per output row and group, ``max |w|`` shrunk by
  ``1 - i / clip_grid`` for ``i < clip_max_shrink * clip_grid``, weights clamped to ``+-max``,
  keeping the shrink with the smallest group output error ``d^T H_gg d`` (AutoAWQ: the same error
  on 512 sampled tokens; here all calibration tokens through ``H``);
- quantizer (AutoAWQ ``pseudo_quantize_tensor``): ``zero_point``: ``scale = (max - min).clamp(1e-5)
  / (2^b - 1)``, ``zero = clamp(-round(min / scale), 0, 2^b - 1)``, ``code = clamp(round(w / scale)
  + zero, 0, 2^b - 1)`` (qtype ``uintB``, integer zeros); without: ``scale = max |w| / (2^(b-1) - 1)``,
  signed codes (qtype ``intB``). Scales are rounded to ``scale_dtype`` (fp16, what AWQ checkpoints
  store) before the codes are computed, so saving is exact.

The calibration driver hands each block to :func:`awq_quantize_block` (``MethodSpec.quantize_block``);
blocks are calibrated on the outputs of the already quantized blocks (AutoAWQ uses the float
outputs). Linears outside the blocks (``quantize_lm_head``) get the clipping search and the
quantizer, no scaling.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyquant.calibration.stats import HessianCollector
from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.methods.rtn import validate_group_size
from polyquant.tensor.affine import block_view
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["AWQConfig", "AWQCollector", "awq_quantize", "awq_quantize_block", "awq_fake_quantize",
           "search_scales", "search_clip", "fold_scales", "scale_groups", "VERSIONS"]

log = logging.getLogger(__name__)

VERSIONS = ("gemm", "gemv")
AWQ_BITS = (2, 3, 4, 5, 6, 8)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FOLD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}  # how much folding may move a block's output
_FOLD_RTOL_HALF = 3e-2  # (relative) in fp32 / in 16-bit weights, where each fold rounds


@dataclass
class AWQConfig(MethodConfig):
    """AWQ.

    Attributes:
        bits: weight bits (AWQ checkpoints store 4; other widths save as compressed-tensors).
        group_size: input columns per scale; -1 for per channel.
        zero_point: asymmetric codes with integer zero points (AWQ's default) or symmetric.
        version: layout when saved as an ``awq`` checkpoint: ``gemm`` (default) or ``gemv``.
        n_grid: alpha grid points in [0, 1).
        duo_scaling: AutoAWQ's ``x_mean^a / w_mean^(1-a)`` scales instead of the paper's ``x_mean^a``.
        clip: run the clipping search.
        clip_grid: shrink step ``1 / clip_grid``; clip_max_shrink: shrink range (steps tried:
            ``int(clip_max_shrink * clip_grid)``).
        clip_skip: Linears whose name contains one of these are not clipped (q/k: their error
            passes through the attention scores).
        scale_dtype: scales are rounded to this dtype before the codes are chosen (AWQ stores fp16).
    """

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_skip: list[str] = field(default_factory=lambda: ["q_", "k_", "query", "key", "Wqkv"])
    scale_dtype: str = "float16"

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in AWQ_BITS:
            raise ValueError(f"bits must be one of {list(AWQ_BITS)}, got {self.bits!r}")
        validate_group_size(self.group_size)
        for name in ("zero_point", "duo_scaling", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.version, str) or self.version.lower() not in VERSIONS:
            raise ValueError(f"version must be one of {list(VERSIONS)}, got {self.version!r}")
        self.version = self.version.lower()
        check_int("n_grid", self.n_grid, 1, 1000)
        check_int("clip_grid", self.clip_grid, 1, 1000)
        if isinstance(self.clip_max_shrink, bool) or not isinstance(self.clip_max_shrink, (int, float)) \
                or not 0 <= float(self.clip_max_shrink) < 1:
            raise ValueError(f"clip_max_shrink must be in [0, 1), got {self.clip_max_shrink!r}")
        if not isinstance(self.clip_skip, list) or not all(isinstance(x, str) for x in self.clip_skip):
            raise ValueError(f"clip_skip must be a list of strings, got {self.clip_skip!r}")
        check_choice("scale_dtype", self.scale_dtype, tuple(_SCALE_DTYPES))

    def describe(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        extra = ("" if self.clip else " no-clip") + (" duo" if self.duo_scaling else "")
        return f"awq w{self.bits} {g} {'zp' if self.zero_point else 'sym'}{extra}"


# -- statistics ------------------------------------------------------------------------------
class AWQCollector(HessianCollector):
    """GPTQ's Hessian ``H = 2/n X^T X`` (float32, :class:`HessianCollector`: its running average and
    autocast guard) plus ``x_mean`` (mean ``|x|`` per input channel) of a Linear's inputs.
    Shareable: Linears fed the very same tensor (q/k/v, gate/up) share one instance, and
    ``result()`` hands them the same tensors."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self._result: dict | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        if x.shape[0] == 0:
            return
        super().add(x)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self._result = None

    def result(self) -> dict:
        if self._result is None:
            x_mean = (self.abs_sum / max(self.n, 1)).float()
            self._result = {**super().result(), "x_mean": x_mean}  # super() fills H's lower blocks
        return self._result


def _collector(lin: nn.Module) -> AWQCollector:
    return AWQCollector(lin.in_features, lin.weight.device)


# -- the quantizer ---------------------------------------------------------------------------
def _gs(config: AWQConfig, inp: int) -> int:
    return inp if config.group_size == -1 or config.group_size >= inp else config.group_size


def _round_scale(s: torch.Tensor, dtype_name: str) -> torch.Tensor:
    dt = _SCALE_DTYPES[dtype_name]
    if dt == torch.float32:
        return s
    fi = torch.finfo(dt)
    return s.clamp(fi.smallest_normal if dt == torch.bfloat16 else 2.0 ** -24, fi.max).to(dt).float()


def _qparams(v: torch.Tensor, config: AWQConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) of each group, ``v [..., gs]`` -> ``[..., 1]``."""
    b = config.bits
    if config.zero_point:
        qmax = 2 ** b - 1
        mx, mn = v.amax(-1, keepdim=True), v.amin(-1, keepdim=True)
        s = _round_scale((mx - mn).clamp(min=1e-5) / qmax, config.scale_dtype)
        z = (-torch.round(mn / s)).clamp(0, qmax)
        return s, z
    s = _round_scale(v.abs().amax(-1, keepdim=True).clamp(min=1e-5) / (2 ** (b - 1) - 1), config.scale_dtype)
    return s, None


def _fake_groups(v: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Quantize-dequantize grouped weights ``v [..., gs]``."""
    s, z = _qparams(v, config)
    b = config.bits
    if z is not None:
        return (torch.clamp(torch.round(v / s) + z, 0, 2 ** b - 1) - z) * s
    return torch.clamp(torch.round(v / s), -(2 ** (b - 1)), 2 ** (b - 1) - 1) * s


def awq_fake_quantize(w: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """``Q(w)`` dequantized, ``[out, in]`` float32 (AutoAWQ's ``pseudo_quantize_tensor``)."""
    out, inp = w.shape
    gs = _gs(config, inp)
    v = block_view(w.float(), (1, gs))  # [out, G, gs], a short last group padded with its own values
    return _fake_groups(v, config).reshape(out, -1)[:, :inp]


def _quantize_weight(w: torch.Tensor, config: AWQConfig) -> QuantizedWeight:
    out, inp = w.shape
    gs = _gs(config, inp)
    v = block_view(w.float(), (1, gs))
    s, z = _qparams(v, config)
    b = config.bits
    if z is not None:
        q = torch.clamp(torch.round(v / s) + z, 0, 2 ** b - 1)
        qtype, zero = f"uint{b}", z[..., 0]
    else:
        q = torch.clamp(torch.round(v / s), -(2 ** (b - 1)), 2 ** (b - 1) - 1) + 2 ** (b - 1)
        qtype, zero = f"int{b}", None
    codes = q.reshape(out, -1)[:, :inp].to(torch.uint8)
    return QuantizedWeight.from_codes(codes, qtype, (1, gs), s[..., 0].contiguous(),
                                      None if zero is None else zero.contiguous())


# -- scale search ----------------------------------------------------------------------------
def _w_mean(w: torch.Tensor, gs: int) -> torch.Tensor:
    """AutoAWQ's per-input-channel mean of ``|W|`` normalized by each group's absmax."""
    out, inp = w.shape
    v = block_view(w.abs(), (1, gs))
    v = v / (v.amax(-1, keepdim=True) + 1e-6)
    return v.reshape(out, -1)[:, :inp].mean(0)


def _candidate(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if w_mean is not None:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _output_error(d: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(D H D^T)``: the summed squared output error of weight error ``D`` on inputs with
    second moment ``H``."""
    return float(((d @ H) * d).sum())


def search_scales(weights: list[torch.Tensor], H: torch.Tensor, x_mean: torch.Tensor, config: AWQConfig
                  ) -> tuple[torch.Tensor, float, list[float]]:
    """The best input scales for Linears sharing an input: ``(s [in], alpha, loss per grid point)``.
    ``weights``: their ``[out_j, in]`` weights; ``H``: the input's ``X^T X`` (any positive factor);
    ``x_mean``: mean ``|x|`` per input channel."""
    w = torch.cat([x.detach().float() for x in weights], 0).to(H.device)
    H = H.float()
    x_mean = x_mean.float().to(H.device)
    w_mean = _w_mean(w, _gs(config, w.shape[1])) if config.duo_scaling else None
    history: list[float] = []
    best, best_alpha, best_s = math.inf, -1.0, None
    for i in range(config.n_grid):
        alpha = i / config.n_grid
        s = _candidate(x_mean, w_mean, alpha)
        d = awq_fake_quantize(w * s, config) / s - w
        loss = _output_error(d, H) / w.shape[0]
        history.append(loss)
        if loss < best:
            best, best_alpha, best_s = loss, alpha, s
    if best_s is None:
        raise ValueError(f"AWQ: every scale candidate gave a non-finite error ({history[:3]}...); "
                         "check the calibration activations")
    return best_s, best_alpha, history


# -- clipping search -------------------------------------------------------------------------
def _diag_blocks(H: torch.Tensor, gs: int) -> torch.Tensor:
    """The ``[G, gs, gs]`` diagonal blocks of ``H`` (zero-padded past the last column)."""
    n = H.shape[0]
    G = math.ceil(n / gs)
    Hp = torch.nn.functional.pad(H, (0, G * gs - n, 0, G * gs - n))
    idx = torch.arange(G, device=H.device)
    return Hp.reshape(G, gs, G, gs)[idx, :, idx, :]


def search_clip(w: torch.Tensor, H: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per (row, group) clipping bound ``[out, G]``: the shrink of ``max |w|`` whose clamped and
    quantized group has the smallest output error ``d^T H_gg d``."""
    w = w.detach().float().to(H.device)
    out, inp = w.shape
    gs = _gs(config, inp)
    v = block_view(w, (1, gs))                       # [out, G, gs]
    Hb = _diag_blocks(H.float(), gs)                 # [G, gs, gs]
    org_max = v.abs().amax(-1, keepdim=True)         # [out, G, 1]
    best_err = torch.full(org_max.shape[:2], math.inf, device=w.device)
    best_max = org_max[..., 0].clone()
    for i in range(int(config.clip_max_shrink * config.clip_grid)):
        mx = org_max * (1 - i / config.clip_grid)
        d = _fake_groups(torch.clamp(v, -mx, mx), config) - v
        dt = d.transpose(0, 1)                       # [G, out, gs]
        err = (torch.bmm(dt, Hb) * dt).sum(-1).t()   # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mx[..., 0], best_max)
    return best_max


def _clip(w: torch.Tensor, max_val: torch.Tensor, gs: int) -> torch.Tensor:
    m = max_val.repeat_interleave(gs, dim=1)[:, : w.shape[1]].to(w.dtype)
    return torch.clamp(w, -m, m)


def _skip_clip(name: str | None, config: AWQConfig) -> bool:
    return name is not None and any(p in name for p in config.clip_skip)


def awq_quantize(weight: torch.Tensor, config: AWQConfig, stats: dict | None = None,
                 name: str | None = None) -> QuantizedWeight:
    """Clipping search (with ``stats["H"]``, unless ``name`` is in ``clip_skip``) and AWQ's
    quantizer for one weight that is already scaled. No scaling here (that needs the block)."""
    if weight.dim() != 2:
        raise ValueError(f"AWQ quantizes 2-D weights, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    H = (stats or {}).get("H")
    if config.clip and isinstance(H, torch.Tensor) and not _skip_clip(name, config):
        if tuple(H.shape) != (w.shape[1], w.shape[1]):
            raise ValueError(f"statistics shape {tuple(H.shape)} does not match {w.shape[1]} input features")
        w = _clip(w, search_clip(w, H, config).to(w.device), _gs(config, w.shape[1]))
    return _quantize_weight(w, config)


# -- folding ---------------------------------------------------------------------------------
def _unit_offset(norm: nn.Module) -> float:
    """Gemma's RMSNorm multiplies by ``1 + weight``."""
    n = type(norm).__name__
    return 1.0 if "Gemma" in n and "RMSNorm" in n else 0.0


def _fold_target(block: nn.Module, group, in_features: int) -> tuple[nn.Module | None, str]:
    """The module the group's scales fold into, or None and why not."""
    if group.feeds is None:
        return None, "no feeding module in the architecture table"
    if not group.scalable:
        return None, f"{group.feeds} reaches it through a nonlinearity or the residual"
    try:
        feed = block.get_submodule(group.feeds)
    except AttributeError:
        return None, f"the block has no module {group.feeds!r}"
    if isinstance(feed, nn.Linear):
        if feed.out_features != in_features:
            return None, (f"{group.feeds} has {feed.out_features} outputs, {in_features} inputs expected "
                          "(e.g. grouped-query attention)")
        return feed, ""
    if type(feed).__name__ == "QuantLinear" or not isinstance(getattr(feed, "weight", None), torch.Tensor):
        return None, f"{group.feeds} ({type(feed).__name__}) has no float weight to fold into"
    if tuple(feed.weight.shape) != (in_features,):
        return None, f"{group.feeds}.weight has shape {tuple(feed.weight.shape)}, not ({in_features},)"
    bias = getattr(feed, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (in_features,)):
        return None, f"{group.feeds}.bias has an unexpected shape"
    return feed, ""


@torch.no_grad()
def fold_scales(feed: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the feed's output channels by ``s`` and multiply the Linears' input columns by ``s``
    (in place): the composed function is unchanged."""
    if isinstance(feed, nn.Linear):
        w = feed.weight
        w.copy_((w.float() / s.to(w.device).view(-1, 1)).to(w.dtype))
    else:
        w, off = feed.weight, _unit_offset(feed)
        w.copy_(((w.float() + off) / s.to(w.device) - off).to(w.dtype))
    b = getattr(feed, "bias", None)
    if b is not None:
        b.copy_((b.float() / s.to(b.device)).to(b.dtype))
    for lin in linears:
        lw = lin.weight
        lw.copy_((lw.float() * s.to(lw.device).view(1, -1)).to(lw.dtype))


def _layout_groups(model: nn.Module, block: nn.Module):
    """The architecture table's groups over every Linear of the block (quantized or not)."""
    from polyquant.calibration.arch import LAYOUTS, MODEL_TYPES, block_groups, layout_for
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    layout = layout_for(model, names)
    if layout is None:
        cfg = getattr(model, "config", None)
        mtype = getattr(cfg, "model_type", None) or type(model).__name__
        raise ValueError(f"AWQ does not know the architecture {mtype!r} (which Linears share an input and "
                         f"what feeds them); known model types: {', '.join(sorted(MODEL_TYPES))}; "
                         f"layouts: {', '.join(LAYOUTS)}. Add it to polyquant.calibration.arch")
    return block_groups(model, names, True)


@torch.no_grad()
def scale_groups(model: nn.Module, block: nn.Module, targets: dict[str, nn.Module], stats: dict[str, dict],
                 config: AWQConfig) -> dict[tuple[str, ...], float]:
    """Search and fold the scales of every scalable group of ``block`` (in place). ``stats``
    (per target Linear: ``H``, ``x_mean``) is updated for the scaled inputs. Returns the alpha
    chosen per group (groups left unscaled are absent)."""
    chosen: dict[tuple[str, ...], float] = {}
    for group in _layout_groups(model, block):
        quantized = [n for n in group.names if n in targets]
        if not quantized:
            continue
        lins = [block.get_submodule(n) for n in group.names]
        in_f = lins[0].in_features
        feed, why = _fold_target(block, group, in_f)
        if feed is None:
            log.info("AWQ: no scaling for %s: %s", ", ".join(group.names), why)
            continue
        st = [stats[n] for n in quantized]
        if any(x["H"] is not st[0]["H"] for x in st):
            warnings.warn(f"AWQ: {', '.join(quantized)} did not receive the same input; not scaled", stacklevel=2)
            continue
        s, alpha, _ = search_scales([targets[n].weight for n in quantized], st[0]["H"], st[0]["x_mean"], config)
        if alpha == 0.0:
            continue  # s == 1
        fold_scales(feed, lins, s)
        s = s.to(st[0]["H"].device)
        new = {"H": st[0]["H"] / (s.view(-1, 1) * s.view(1, -1)), "x_mean": st[0]["x_mean"] / s}
        for x in st:  # the same dict for shared inputs: update once per distinct dict
            x.update(new)
        chosen[group.names] = alpha
    return chosen


# -- the block hook --------------------------------------------------------------------------
def awq_quantize_block(job) -> dict[str, tuple[QuantizedWeight, torch.Tensor, dict]]:
    """Scale, clip and quantize one block (see :class:`polyquant.calibration.driver.BlockJob`)."""
    config = job.config
    _layout_groups(job.model, job.block)  # refuses an unknown architecture before any work
    collectors = job.collect(job.linears)
    missing = [n for n in job.linears if n not in collectors]
    if missing:
        raise ValueError(f"block {job.index}: {missing} received no calibration input")
    stats: dict[str, dict] = {}
    by_id: dict[int, dict] = {}
    for n in job.linears:  # Linears sharing a collector share one stats dict
        c = collectors[n]
        stats[n] = by_id.setdefault(id(c), dict(c.result()))
    ref = job.run_sample(0, exact=True)  # the fold check compares exact forwards, not bf16 autocast
    chosen = scale_groups(job.model, job.block, job.linears, stats, config)
    if chosen:
        new = job.run_sample(0, exact=True)
        rel = float((new - ref).float().norm() / ref.float().norm().clamp_min(1e-30))
        tol = _FOLD_RTOL.get(next(iter(job.linears.values())).weight.dtype, _FOLD_RTOL_HALF)
        if not math.isfinite(rel) or rel > tol:
            raise RuntimeError(f"AWQ: folding the scales changed block {job.index}'s float output (relative "
                               f"{rel:.2e}); the architecture table does not match this model")
        log.debug("block %d: alphas %s", job.index, chosen)
    out = {}
    for n, lin in job.linears.items():
        w = lin.weight.detach()
        out[n] = (awq_quantize(w, config, stats[n], name=n), w.float().clone(), stats[n])
    return out


register_method(MethodSpec(
    name="awq",
    config_cls=AWQConfig,
    quantize_weight=awq_quantize,
    needs_calibration=True,
    family="calibration-based",
    bits=AWQ_BITS,
    formats=("awq", "compressed-tensors"),
    description="activation-aware per-channel scales folded into the previous op, clipping search, asym RTN",
    reference="Lin et al. 2023, AWQ (arXiv 2306.00978); mit-han-lab/llm-awq, AutoAWQ",
    collect=_collector,
    quantize_block=awq_quantize_block,
    order=30,
    presets=(Preset("awq-w4-g64", {"bits": 4, "group_size": 64}),),
    priors=(Prior(8, None, None, rel(14.041), "assumed: as int8 per-row absmax (" + BENCH + ": pq-torchao-int8 14.041)"),
            Prior(4, None, None, rel(15.578), BENCH + ": AWQ W4 g64, exact fp32 calibration, 128 x 512: 15.578")),
))
