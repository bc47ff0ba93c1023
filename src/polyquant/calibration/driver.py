"""The sequential calibration driver: quantize a model one repeated block (decoder layer) at a time.

1. Capture. One forward per calibration sample with every block's ``forward`` temporarily replaced
   by a recorder: it keeps block 0's input hidden states and, for every block, the other arguments
   (attention mask, position embeddings, cache position ...; blocks may get different ones, e.g.
   Gemma's sliding/global layers), passes the hidden states through untouched and stops the
   forward (a "Catcher" exception) at the last block. No graph tracing, no block weights touched.
2. Per block: hook the block's target Linears to accumulate the statistics the method asks for
   (``spec.collect``, default GPTQ's Hessian), run the block's inputs through it,
   quantize with ``spec.quantize_weight(weight, config, stats)``. True-sequential (default): the
   Linears go group by group (``arch.block_groups``) and each group's statistics are collected
   with the earlier groups already quantized; a statistics pass stops as soon as the group's
   Linears have seen their input. During calibration a quantized Linear computes with its exact
   dequantized weight; the block's outputs, recomputed that way, are the next block's inputs.
   Linears that got the same input tensor on a pass's first sample (q/k/v, gate/up) are fed
   together from the second sample on, so the pass stops at the first of them. Across these
   passes the block's children, quantized stand-ins and attention cores whose inputs and weights
   did not change give their earlier outputs instead of recomputing them (``memo.py``;
   bit-identical). Then the Linears become ``QuantLinear``.
3. Linears outside the blocks (e.g. ``lm_head`` when asked) are calibrated last, from one forward
   whose blocks replay the recorded final hidden states.

A method that works on a whole block at once (AWQ: scales shared by a group of Linears, folded
into the module that feeds them) sets ``spec.quantize_block``: a callable taking a
:class:`BlockJob` and returning ``{name: (QuantizedWeight, reference float weight, stats)}`` for
every target Linear of the block; it replaces step 2's group loop and may change the block's
float modules in place (the driver restores them if anything fails, and a resume folder keeps
them).

Only the current block and the activations need to be on the compute device (``device``). With
``resume_dir`` every finished block is saved and a restarted run skips it (``checkpoint.py``).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.calibration.arch import block_groups
from polyquant.calibration.capture import _capture, _model_forward, _move, _patched_forwards, _run_block, _split, _Stop
from polyquant.calibration.checkpoint import ResumeState, run_key
from polyquant.calibration.data import as_samples
from polyquant.calibration.memo import BlockMemo
from polyquant.calibration.stats import collector_factory
from polyquant.calibration.tune import TuneJob
from polyquant.nn.quantize import make_quant_linear, module_device, replace_module
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.select import find_blocks
from polyquant.progress import progress
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["BlockJob", "Calibration", "run_sequential", "resolve_autocast"]

log = logging.getLogger(__name__)
_NONE = object()


@dataclass
class Calibration:
    """Calibration data plus run options, accepted wherever calibration data is
    (``polyquant.quantize(model, cfg, calibration=Calibration(samples, resume_dir="ckpt"))``).

    Attributes:
        samples: token windows (see :func:`polyquant.calibration_data`).
        device: where each block is calibrated (default: where the block is).
        resume_dir: folder for per-block checkpoints; a restarted run resumes from it.
        autocast: run the block forwards under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``: 4-6x faster matmuls on a CPU with AMX/AVX-512-BF16, at the cost
            of bf16 rounding in the activations); statistics and the quantization itself stay
            float32. None: the model's own dtype, exactly its forward. ``"auto"`` (default):
            bf16 for a float32 model calibrated on a CUDA GPU, exact on a CPU -- see
            :func:`resolve_autocast`. Measured on the default model (32 x 512 tokens, 1 thread,
            AMX CPU): GPTQ W4 g64 act-order 86 s / ppl 16.114 with bf16 against 140 s / 16.108
            exact, but the group-aware order 82 s / 16.516 against 125 s / 16.245: bf16 on a CPU
            is a speed option, not the default.
    """

    samples: Any
    device: str | torch.device | None = None
    resume_dir: str | os.PathLike | None = None
    autocast: torch.dtype | str | None = "auto"


def resolve_autocast(autocast: torch.dtype | str | None, model: nn.Module,
                     device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype a run uses: ``"auto"`` is bf16 for a float32 model calibrated on a CUDA
    GPU with bf16 (as GPU GPTQ tools run their forwards in half precision), else None: exact
    forwards on a CPU (bf16 there is opt-in; see :class:`Calibration`)."""
    if autocast is None or isinstance(autocast, torch.dtype):
        return autocast
    if autocast != "auto":
        raise ValueError(f"autocast must be a torch dtype, None or 'auto', got {autocast!r}")
    p = next(model.parameters(), None)
    if p is None or p.dtype != torch.float32:
        return None
    dev = torch.device(device) if device is not None else p.device
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return None


@dataclass
class BlockJob:
    """One block handed to a method's ``spec.quantize_block``.

    Attributes:
        model: the whole model (for ``config.model_type`` / the architecture table).
        block: the block (its target Linears are still the float ``nn.Linear`` modules).
        index: the block's index.
        linears: the block's target Linears by name relative to the block, in module order.
        config: the method config.
        collect: ``collect(linears) -> {name: collector}`` runs the block's calibration inputs
            with the method's statistics hooks on ``linears`` (as the group loop does).
        run_sample: ``run_sample(j)`` is the block's output for calibration sample ``j`` (for checks);
            ``run_sample(j, exact=True)`` runs it without the calibration autocast (the model's dtype).
    """

    model: nn.Module
    block: nn.Module
    index: int
    linears: dict[str, nn.Module]
    config: Any
    collect: Callable[[dict[str, nn.Module]], dict[str, Any]]
    run_sample: Callable[[int], torch.Tensor]


class _FakeQuant(nn.Module):
    """Stand-in for a quantized Linear during calibration: the exact dequantized weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# -- capture -------------------------------------------------------------------------------
# -- per block -----------------------------------------------------------------------------
def _collect(blk: nn.Module, lins: dict[str, nn.Module], factory, inps: list[torch.Tensor], recs: list,
             autocast: torch.dtype | None = None, memo: BlockMemo | None = None) -> dict:
    """Run the block on every input with hooks on ``lins``; returns ``{name: collector}``.
    A forward stops once all of ``lins`` have seen their input. Linears that got the very same
    input tensor on the first sample (q/k/v of one norm's output, gate/up) are siblings: from the
    second sample on, the first of them to see its input feeds the others too, so the forward stops
    there (q's and k's, gate's products are not computed for nothing). With ``memo`` the block's
    children that did not change since an earlier pass give their earlier outputs (``memo.py``)."""
    collectors: dict[str, Any] = {}
    want = set(lins)
    state: dict[str, Any] = {}
    first: dict[str, int] = {}     # sample 0: the input each Linear got (by id)
    siblings: dict[str, list] = {}  # from sample 1 on: the Linears that got the same input object

    def feed(name, mod, x):
        alive, fed = state["alive"], state["fed"]
        c = collectors.get(name)
        if c is None:
            other = alive.get(id(x))
            c = other[1] if other is not None and getattr(other[1], "shareable", False) else factory(mod)
            collectors[name] = c
        alive.setdefault(id(x), (x, c))  # keeps x alive, so its id stays unique this forward
        if (id(c), id(x)) not in fed:
            c.add(x)
            fed.add((id(c), id(x)))
        state["seen"].add(name)

    def make_hook(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            seen = state["seen"]
            feed(name, mod, x)
            if state["j"] == 0:  # a Linear called twice in one forward has no siblings
                first[name] = None if name in first else id(x)
            for other in siblings.get(name, ()):
                if other not in seen:  # q's input is k's and v's: their forwards need not run
                    feed(other, lins[other], x)
            if seen == want:
                raise _Stop
        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, lin in lins.items()]
    if memo is not None:
        memo.hooked = {id(m) for m in lins.values()}
    try:
        for j, (h, rec) in enumerate(zip(inps, recs)):
            state.update(alive={}, fed=set(), seen=set(), j=j)
            if memo is not None:
                memo.sample = j
            try:
                _run_block(blk, h, rec, autocast)
            except _Stop:
                pass
            if j == 0:
                siblings.update({a: [b for b in lins if b != a and first.get(b) == ia]
                                 for a, ia in first.items() if ia is not None})
    finally:
        for hd in handles:
            hd.remove()
        state.clear()
        if memo is not None:
            memo.hooked, memo.sample = set(), None
    return collectors


def _relative_error(w: torch.Tensor, qw: QuantizedWeight, stats: dict | None) -> float:
    """Hessian-weighted relative output error ``tr(D H D^T) / tr(W H W^T)`` (D = W - Q), or the
    plain relative weight error when the method collects no Hessian."""
    w = w.detach().float()
    q = qw.dequantize(torch.float32).to(w.device)
    d = w - q
    H = (stats or {}).get("H")
    if isinstance(H, torch.Tensor) and H.shape == (w.shape[1], w.shape[1]):
        H = H.to(w.device)
        num, den = ((d @ H) * d).sum(), ((w @ H) * w).sum()
    else:
        num, den = d.pow(2).sum(), w.pow(2).sum()
    return float(num / den.clamp_min(1e-30))


def _swap_in_fake(blk: nn.Module, name: str, qw: QuantizedWeight, lin: nn.Module) -> None:
    w = lin.weight
    replace_module(blk, name, _FakeQuant(qw.dequantize(w.dtype).to(w.device), lin.bias))


def _tune(blk, i, tuner, qws, lins, inps, recs, targets, autocast) -> dict[str, QuantizedWeight]:
    """Run the method's block tuner on the quantized block and swap in the stand-ins of what it returns
    (the Linears' recorded errors stay the layer-wise ones, measured before tuning)."""
    tuned = tuner(TuneJob(blk, i, dict(qws), dict(lins), inps, recs, targets, autocast))
    if set(tuned) != set(qws):
        raise ValueError(f"block {i}: the tuner returned {sorted(tuned)}, expected {sorted(qws)}")
    for name, qw in tuned.items():
        _swap_in_fake(blk, name, qw, lins[name])
    return tuned


def _finish_block(blk, spec, config, qws: dict[str, QuantizedWeight], originals: dict[str, nn.Module]) -> None:
    for name, qw in qws.items():
        replace_module(blk, name, make_quant_linear(spec, config, qw, originals[name]))


def _set_kernels(blk: nn.Module) -> None:
    for m in blk.modules():
        if isinstance(m, QuantLinear):
            m.set_kernel(m._kernel_request)


# -- the driver ----------------------------------------------------------------------------
def run_sequential(model: nn.Module, spec, config, targets: list[tuple[str, nn.Module]], calibration: Any,
                   show_progress: bool = True, *, device: str | torch.device | None = None,
                   resume_dir: str | os.PathLike | None = None, autocast: torch.dtype | str | None = _NONE
                   ) -> dict[str, Any]:
    """Quantize ``targets`` (``(name, Linear)`` pairs of ``model``) block by block with calibration
    data; swaps in ``QuantLinear`` modules in place. Returns a summary: ``errors`` (per Linear,
    the Hessian-weighted relative output error), ``blocks``, ``resumed_blocks``, ``seconds``.

    ``calibration``: token windows (see :func:`polyquant.calibration.data.as_samples`) or a
    :class:`Calibration` carrying them with ``device`` / ``resume_dir``.
    """
    t0 = time.perf_counter()
    if isinstance(calibration, Calibration):
        device = device if device is not None else calibration.device
        resume_dir = resume_dir if resume_dir is not None else calibration.resume_dir
        autocast = autocast if autocast is not _NONE else calibration.autocast
        calibration = calibration.samples
    elif autocast is _NONE:
        autocast = "auto"
    samples = as_samples(calibration)
    prefix, blocks = find_blocks(model)
    n_blocks = len(blocks)
    per_block: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    tail: dict[str, nn.Module] = {}
    for name, lin in targets:
        idx, _, rel = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
        if idx.isdigit() and int(idx) < n_blocks and rel:
            per_block[int(idx)][rel] = lin
        else:
            tail[name] = lin
    factory = collector_factory(spec)
    true_seq = bool(getattr(config, "true_sequential", True))
    dev = torch.device(device) if device is not None else None
    autocast = resolve_autocast(autocast, model, dev)
    resume = None
    if resume_dir is not None:
        key_cfg = {**config.to_dict(), "_autocast": str(autocast)}  # autocast changes the result too
        resume = ResumeState(resume_dir, run_key(model, spec.name, key_cfg, targets, samples), n_blocks)
        if resume.blocks_done:
            log.info("resuming from %s: %d of %d blocks done", resume.folder, resume.blocks_done, n_blocks)
    resumed = resume.blocks_done if resume else 0  # blocks_done grows as blocks are saved

    errors: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # blocks after the last one with targets matter only to Linears outside the blocks
            n_run = n_blocks if tail else 1 + max((i for i in range(n_blocks) if per_block[i]), default=-1)
            inps, recs, struct = _capture(model, blocks[:max(n_run, 1)], samples, dev)
            bar = progress(range(n_run), desc=f"{spec.name} blocks", enabled=show_progress)
            for i in bar:
                blk = blocks[i]
                errs = _process_block(model, blk, i, per_block[i], spec, config, factory, true_seq, inps,
                                      [r[i] for r in recs], dev, resume, autocast)
                errors.update({f"{prefix}.{i}.{k}": v for k, v in errs.items()})
                if errs:
                    bar.set_postfix_str(f"err={sum(errs.values()) / len(errs):.2e} max={max(errs.values()):.2e}")
                    log.debug("block %d/%d: %s", i + 1, n_blocks, {k: f"{v:.3e}" for k, v in errs.items()})
            bar.close()
            if tail:
                errors.update(_process_tail(model, blocks, tail, spec, config, factory, samples, inps, struct))
    finally:
        model.train(was_training)
    return {"errors": errors, "blocks": n_blocks, "resumed_blocks": resumed,
            "seconds": time.perf_counter() - t0, "autocast": str(autocast).replace("torch.", "") if autocast else None}


def _process_block(model, blk, i, lins, spec, config, factory, true_seq, inps, recs, dev, resume,
                   autocast=None) -> dict[str, float]:
    """Quantize one block's Linears (or load them from the resume folder); replaces ``inps`` by the
    block's outputs."""
    orig_dev = module_device(blk)
    work_dev = dev if dev is not None else orig_dev
    moved = work_dev != orig_dev
    if moved:
        blk.to(work_dev)
    memo: dict = {}
    recs = [_move(r, work_dev, memo) for r in recs]
    originals = dict(lins)
    qws: dict[str, QuantizedWeight] = {}
    errs: dict[str, float] = {}
    block_fn = spec.quantize_block if lins else None
    snapshot = floats = reuse = None
    stack = ExitStack()
    if callable(block_fn):  # the method may change float modules of the block: keep a copy
        snapshot = {k: v.detach().clone() for k, v in blk.state_dict().items()}
    try:
        if resume is not None and i < resume.blocks_done:
            qws, errs = resume.load_block(i)
            if set(qws) != set(lins):
                raise ValueError(f"resume folder block {i} holds {sorted(qws)}, expected {sorted(lins)}")
            if snapshot is not None:
                saved = resume.load_floats(i)
                if saved:
                    blk.load_state_dict({k: v.to(snapshot[k].device) for k, v in saved.items()}, strict=False)
            for name, qw in qws.items():
                _swap_in_fake(blk, name, qw, lins[name])
        elif callable(block_fn):
            names = [n for n, _ in blk.named_modules() if n in lins]  # module order
            job = BlockJob(model, blk, i, {n: lins[n] for n in names}, config,
                           lambda group_lins: _collect(blk, group_lins, factory, inps, recs, autocast),
                           lambda j, exact=False: _run_block(blk, inps[j], recs[j], None if exact else autocast))
            results = block_fn(job)
            if set(results) != set(lins):
                raise ValueError(f"{spec.name}: block {i} quantized {sorted(results)}, expected {sorted(lins)}")
            for name, (qw, ref, stats) in results.items():
                qws[name] = qw
                errs[name] = _relative_error(ref, qw, stats)
            if resume is not None:  # the block's float state as the method left it
                skip = {f"{n}.weight" for n in lins}
                floats = {k: v.detach().cpu().clone() for k, v in blk.state_dict().items() if k not in skip}
            for name, qw in qws.items():
                _swap_in_fake(blk, name, qw, lins[name])
        else:
            tuner = spec.block_tuner(config) if lins and spec.block_tuner is not None else None
            targets = [_run_block(blk, inps[j], recs[j], autocast) for j in range(len(inps))] if tuner else None
            reuse = stack.enter_context(BlockMemo(blk)) if lins and true_seq else None
            names = [n for n, _ in blk.named_modules() if n in lins]  # module order
            for group in block_groups(model, names, true_seq):
                group_lins = {n: blk.get_submodule(n) for n in group.names}
                collectors = _collect(blk, group_lins, factory, inps, recs, autocast, reuse)
                for name in group.names:
                    if name not in collectors:
                        raise ValueError(f"block {i}: {name} received no calibration input")
                    stats = collectors[name].result()
                    lin = group_lins[name]
                    qw = spec.quantize_weight(lin.weight.data, config, stats)
                    errs[name] = _relative_error(lin.weight.data, qw, stats)
                    qws[name] = qw
                    _swap_in_fake(blk, name, qw, lin)
                    if reuse is not None:
                        reuse.wrap(name, blk.get_submodule(name))
                del collectors
            if tuner is not None:  # the stand-ins change: no output of this block's passes is reusable
                stack.close()
                reuse = None
                qws = _tune(blk, i, tuner, qws, lins, inps, recs, targets, autocast)
                del targets
        if reuse is not None:
            reuse.keep = False
        for j in range(len(inps)):
            if reuse is not None:
                reuse.sample = j
            inps[j] = _run_block(blk, inps[j], recs[j], autocast)
        stack.close()
    except BaseException:
        stack.close()
        for name, lin in originals.items():  # leave the block as it was
            replace_module(blk, name, lin)
        if snapshot is not None:
            blk.load_state_dict(snapshot)
        if moved:
            blk.to(orig_dev)
        raise
    _finish_block(blk, spec, config, qws, originals)
    if moved:
        blk.to(orig_dev)
        _set_kernels(blk)
    if resume is not None and i >= resume.blocks_done:
        if floats is not None:
            resume.save_block(i, {k: v.to("cpu") for k, v in qws.items()}, errs, floats=floats)
        else:
            resume.save_block(i, {k: v.to("cpu") for k, v in qws.items()}, errs)
    return errs


def _process_tail(model, blocks, tail, spec, config, factory, samples, finals, struct) -> dict[str, float]:
    """Calibrate Linears outside the blocks: one forward per sample in which the blocks replay the
    recorded final hidden states, with hooks on the tail Linears."""
    n = len(blocks)
    current: dict[str, int] = {}

    def replay(i, *args, **kwargs):
        h, _ = _split(args, kwargs)
        if i == n - 1:
            h = finals[current["j"]].to(h.device)
        return h if struct is None else (h,) + (None,) * (struct - 1)

    collectors: dict[str, Any] = {}
    seen: set[str] = set()
    handles = []
    for name, lin in tail.items():
        def hook(mod, args, kwargs, name=name):
            x = args[0] if args else kwargs["input"]
            if name not in collectors:
                collectors[name] = factory(mod)
            collectors[name].add(x)
            seen.add(name)
            if len(seen) == len(tail):
                raise _Stop  # nothing after the last tail Linear is needed (e.g. the logits)
        handles.append(lin.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with _patched_forwards(blocks, replay):
            for j, s in enumerate(samples):
                current["j"] = j
                seen.clear()
                _model_forward(model, s)
    finally:
        for hd in handles:
            hd.remove()
    errs = {}
    for name, lin in tail.items():
        if name not in collectors:
            raise ValueError(f"{name} received no calibration input")
        stats = collectors[name].result()
        qw = spec.quantize_weight(lin.weight.data, config, stats)
        errs[name] = _relative_error(lin.weight.data, qw, stats)
        replace_module(model, name, make_quant_linear(spec, config, qw, lin))
    return errs
