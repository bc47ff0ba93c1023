"""Block fine-tuning: fit a quantized block's continuous parameters to the float block's outputs.

After the sequential driver has quantized a block Linear by Linear (each against its own output
error), the block as a whole still drifts from the float one: errors of q/k/v pass through the
attention, those of gate/up through the activation. AQLM's paper closes much of that gap by tuning
what stays continuous - code books and scales - so that the quantized block, fed the calibration
inputs the quantized model really sees, reproduces the float block's outputs on the same inputs.

The driver (``MethodSpec.block_tuner``) runs the float block on the inputs first (the targets), then
quantizes, then hands a :class:`TuneJob` to the method's tuner, which builds one trainable module per
Linear (its parameters, a differentiable ``forward``, an ``export`` to a ``QuantizedWeight``) and calls
:func:`fit_block`. Only those modules' parameters are trained (every other parameter of the block is
frozen for the duration); the loss is the relative squared error of the block's outputs,
``sum ||y - t||^2 / sum ||t||^2`` over the calibration samples. Adam, a fixed number of epochs over
the samples in a seeded order with gradients accumulated over ``batch`` samples per step, an early
stop when an epoch improves the loss by less than ``tolerance`` (relative), and the best state seen
kept (the untuned one included: tuning never makes a block worse on its calibration data). The
result depends on the seed, the block index and the thread count only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyquant.calibration.capture import _run_block
from polyquant.nn.quantize import replace_module
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["TuneJob", "TuneSettings", "fit_block"]


@dataclass
class TuneJob:
    """One block handed to a method's tuner.

    Attributes:
        block: the block; its target Linears are the driver's dequantized stand-ins.
        index: the block's index.
        qws: the block's quantized weights by Linear name (relative to the block).
        linears: the original float Linears by the same names (bias, dtype, device).
        inputs: the block's calibration inputs (outputs of the quantized blocks before it).
        records: each sample's other block arguments (as the driver captured them).
        targets: the float block's outputs on ``inputs``.
        autocast: the driver's calibration autocast dtype (None: exact).
    """

    block: nn.Module
    index: int
    qws: dict[str, QuantizedWeight]
    linears: dict[str, nn.Module]
    inputs: list[torch.Tensor]
    records: list[Any]
    targets: list[torch.Tensor]
    autocast: torch.dtype | None = None


@dataclass
class TuneSettings:
    """What :func:`fit_block` does (methods validate their own fields and build this)."""

    epochs: int
    lr: float
    batch: int = 4
    tolerance: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0


@dataclass
class TuneResult:
    """``loss_before`` / ``loss_after``: the relative output error before tuning and of the state kept."""

    loss_before: float
    loss_after: float
    epochs: int
    seconds: float
    history: list[float] = field(default_factory=list)


def _block_loss(job: TuneJob, den: float) -> float:
    """The relative output error of the block over every sample (``den``: the targets' squared norm)."""
    num = 0.0
    for j, t in enumerate(job.targets):
        y = _run_block(job.block, job.inputs[j], job.records[j], job.autocast)
        num += float((y.float() - t.float()).pow(2).sum())
    return num / den


def fit_block(job: TuneJob, modules: dict[str, nn.Module], settings: TuneSettings) -> TuneResult:
    """Train ``modules`` (one per Linear name of ``job.qws``, swapped into the block for the duration)
    so that the block's outputs approach ``job.targets``; leaves the modules at the best state seen.
    The block gets back the stand-ins it had."""
    t0 = time.perf_counter()
    blk = job.block
    params = [p for m in modules.values() for p in m.parameters()]
    frozen = [(p, p.requires_grad) for p in blk.parameters()]
    before = {name: blk.get_submodule(name) for name in modules}
    n = len(job.inputs)
    den = max(sum(float(t.float().pow(2).sum()) for t in job.targets), 1e-30)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for name, m in modules.items():
            replace_module(blk, name, m)
        with torch.no_grad():
            best = _block_loss(job, den)
        first = best
        best_state = [p.detach().clone() for p in params]
        if not params or settings.epochs <= 0 or n == 0:
            return TuneResult(first, best, 0, time.perf_counter() - t0, [first])
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=settings.lr, betas=settings.betas)
        gen = torch.Generator().manual_seed(int(settings.seed) * 1_000_003 + job.index)
        history = [first]
        prev = first
        epoch = 0
        for epoch in range(1, settings.epochs + 1):
            order = torch.randperm(n, generator=gen).tolist()
            with torch.enable_grad():
                for start in range(0, n, settings.batch):
                    opt.zero_grad(set_to_none=True)
                    for j in order[start:start + settings.batch]:
                        y = _run_block(blk, job.inputs[j], job.records[j], job.autocast)
                        loss = (y.float() - job.targets[j].float()).pow(2).sum() / den
                        loss.backward()
                    opt.step()
            with torch.no_grad():
                cur = _block_loss(job, den)
            history.append(cur)
            if cur < best:
                best = cur
                best_state = [p.detach().clone() for p in params]
            if prev <= 0 or (prev - cur) / prev < settings.tolerance:
                break
            prev = cur
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        return TuneResult(first, best, epoch, time.perf_counter() - t0, history)
    finally:
        for p in params:
            p.requires_grad_(False)
        for name, m in before.items():
            replace_module(blk, name, m)
        for p, flag in frozen:
            p.requires_grad_(flag)
