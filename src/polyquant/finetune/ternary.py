"""Ternary fine-tuning: turn an ordinary model into a usable BitNet b1.58 one.

Post-training absmean ternarization (``--method bitnet``) destroys a model that was not trained
ternary. Here the selected Linears become :class:`STEBitLinear` layers - float master weights,
ternarized (absmean per tensor) and their inputs quantized by BitLinear's int8 per-token rule on every
forward pass, both with straight-through estimators - and the model is trained for ``steps`` steps on
windows of the calibration text with the float model's logits as the teacher (KL(teacher || student)
at ``temperature``). ``quant_warmup`` steps blend float and quantized values linearly at the start
(``x + lambda * (q(x) - x)``, lambda 0 -> 1; the "lambda warm-up" of Hugging Face's 1.58-bit fine-tuning
write-up), so training starts from the float model rather than from the collapsed PTQ one. At the end
the master weights are ternarized with the same rule (``polyquant.methods.bitnet``) into ``QuantLinear``
layers, and the model can be saved as a BitNet checkpoint.

The loop, its checkpoints and bit-identical resume are ``polyquant.finetune.distill``'s.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from polyquant.activations.bitnet import BitNetActivation
from polyquant.finetune.distill import STATE_FILE, DistillConfig, distill, set_norms_trainable
from polyquant.methods.base import check_choice, check_int
from polyquant.methods.bitnet import WEIGHT_FLOOR, BitNetConfig, LINEAR_CLASSES, bitnet_quantize
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import QuantRecord, _untie_if_needed, get_record, replace_module
from polyquant.nn.select import select_linears

__all__ = ["TernaryFinetuneConfig", "STEBitLinear", "finetune_ternary", "to_bitnet", "STATE_FILE"]

@dataclass
class TernaryFinetuneConfig(DistillConfig):
    """Settings of a ternary fine-tuning run (validated on construction): ``DistillConfig``'s schedule
    (steps, seq_len, batch_size, lr, lr_warmup, temperature, weight_decay, train_norms, seed,
    checkpoint_every) and

    Attributes:
        quant_warmup: steps over which the quantization is blended in (0: fully ternary from step 1).
        include / exclude / quantize_lm_head: which Linears (as ``MethodConfig``).
        linear_class: the BitNet class the result is saved as.
    """

    quant_warmup: int = 50
    include: list[str] | None = None
    exclude: list[str] = dataclasses.field(default_factory=list)
    quantize_lm_head: bool = False
    linear_class: str = "autobitlinear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("quant_warmup", self.quant_warmup, 0)
        check_choice("linear_class", self.linear_class, LINEAR_CLASSES)
        if self.include is not None and not isinstance(self.include, list):
            raise ValueError(f"include must be a list of regexes, got {self.include!r}")
        if not isinstance(self.exclude, list):
            raise ValueError(f"exclude must be a list of regexes, got {self.exclude!r}")

    def lam_at(self, step: int) -> float:
        """Quantization blend of step ``step`` (1 = fully ternary)."""
        return 1.0 if self.quant_warmup == 0 else min(1.0, (step + 1) / self.quant_warmup)


class STEBitLinear(nn.Module):
    """A Linear trained ternary: ``F.linear(q_x(x), q_w(W), b)`` with straight-through gradients.

    ``q_w`` is BitNet's absmean rule per tensor (as transformers' ``WeightQuant``), ``q_x`` BitLinear's
    int8 per-token rule; ``lam`` < 1 blends each with its float value (``v + lam * (q(v) - v)``)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(lin.weight.detach().clone().float())
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone().float(), requires_grad=False)
        self.rule = BitNetActivation()
        self.lam = 1.0

    @staticmethod
    def ternarize(w: torch.Tensor) -> torch.Tensor:
        s = 1.0 / w.abs().mean().clamp(min=WEIGHT_FLOOR)
        return (w * s).round().clamp(-1, 1) / s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        lam = self.lam
        wq = w + (lam * (self.ternarize(w.detach()) - w.detach()))
        xq = x + (lam * (self.rule(x.detach()) - x.detach()))
        return F.linear(xq, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary STE, lam={self.lam:g}"


# -- the run ----------------------------------------------------------------------------------
def _prepare(model: nn.Module, cfg: TernaryFinetuneConfig) -> tuple[nn.Module, list[str]]:
    student = copy.deepcopy(model)
    targets = select_linears(student, cfg.include, cfg.exclude, cfg.quantize_lm_head)
    if not targets:
        raise ValueError("no Linear layer matched the include/exclude patterns")
    names = [n for n, _ in targets]
    _untie_if_needed(student, names)
    for p in student.parameters():
        p.requires_grad_(False)
    for n, lin in targets:
        replace_module(student, n, STEBitLinear(lin))
    if cfg.train_norms:
        set_norms_trainable(student, skip=(STEBitLinear,))
    return student, names


def finetune_ternary(model: nn.Module, tokens: torch.Tensor, config: TernaryFinetuneConfig, *,
                     checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                     show_progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None,
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a ternary copy of ``model`` (left untouched; it is the teacher) on ``tokens`` (1-D ids).

    Returns ``(student, info)``: the student with ``STEBitLinear`` layers (convert with :func:`to_bitnet`)
    and ``{"step", "done", "losses", "seconds", "resumed_from"}``. ``checkpoint_dir``: where the state
    is kept and resumed from (a config that differs from the stored one is refused). ``stop_after``:
    run at most this many steps in this call (then checkpoint and return, ``done`` False).
    ``log`` receives ``{"step", "loss", "lr", "lam", "seconds"}`` after each step.
    """
    if get_record(model) is not None:
        raise ValueError("fine-tune a float model: this one is already quantized by polyquant")
    student, names = _prepare(model, config)
    stes = [m for m in student.modules() if isinstance(m, STEBitLinear)]

    def blend(step: int) -> dict[str, Any]:
        lam = config.lam_at(step)
        for m in stes:
            m.lam = lam
        return {"lam": lam}

    info = distill(model, student, tokens, config, checkpoint_dir=checkpoint_dir, stop_after=stop_after,
                   show_progress=show_progress, log=log, desc="finetune-ternary", before_step=blend,
                   meta_extra={"modules": names})
    for m in stes:
        m.lam = 1.0
    return student, info | {"modules": names}


def to_bitnet(student: nn.Module, config: TernaryFinetuneConfig, info: dict[str, Any] | None = None,
              kernel: str = "auto") -> nn.Module:
    """Replace every ``STEBitLinear`` by a ternary ``QuantLinear`` (absmean per tensor of its master
    weight, BitLinear's activation rule) in place; the model gets a ``bitnet`` record (saved as a BitNet
    checkpoint by ``polyquant.formats.save``)."""
    bcfg = BitNetConfig(include=config.include, exclude=list(config.exclude), quantize_lm_head=config.quantize_lm_head,
                        linear_class=config.linear_class)
    names = []
    for n, m in list(student.named_modules()):
        if isinstance(m, STEBitLinear):
            qw = bitnet_quantize(m.weight.detach(), bcfg)
            bias = None if m.bias is None else m.bias.detach()
            replace_module(student, n, QuantLinear(qw, bias, kernel=kernel, act_quant=BitNetActivation(), method="bitnet"))
            names.append(n)
    for p in student.parameters():
        p.requires_grad_(False)
    extra = {"finetune": {k: v for k, v in (info or {}).items() if k != "modules"} | {"config": config.to_dict()}}
    student.polyquant = QuantRecord("bitnet", bcfg.to_dict(), names, seconds=float((info or {}).get("seconds", 0.0)),
                                    extra=extra)
    return student
