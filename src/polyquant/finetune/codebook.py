"""Global fine-tuning of a code-book (AQLM) model: the whole model, end to end, against the float one.

Block fine-tuning (``AQLMConfig.finetune_epochs``) fits each decoder block's code books to the float
block's outputs, one block at a time; errors that only show several blocks later, or in the logits,
stay. This is the AQLM paper's last step (Egiazarian et al. 2024, section 4.3 "fine-tuning"; PV-tuning's
continuous half): every quantized Linear whose weight is ``scale[o] * sum_m codebooks[m, codes]``
becomes a ``TrainableAQLM`` (code books and scales trainable, codes fixed), the norms train too (
``train_norms``), and the model is distilled from the float model's logits on windows of the calibration
text (``polyquant.finetune.distill``: KL, AdamW, cosine schedule, atomic checkpoints, bit-identical
resume). At the end each layer's tuned code books and scales are rounded to float16 into a
``QuantLinear`` of the same layout, so the result saves as the same AQLM checkpoint as before.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from polyquant.finetune.distill import DistillConfig, distill, set_norms_trainable
from polyquant.methods.aqlm import TrainableAQLM
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import get_record, replace_module

__all__ = ["CodebookFinetuneConfig", "finetune_codebooks"]


@dataclass
class CodebookFinetuneConfig(DistillConfig):
    """``DistillConfig``'s schedule with defaults measured on SmolLM2-135M AQLM 2x8
    (``benchmarks/bench_aqlm.py global``: of lr 3e-4, 1e-3 and 3e-3 at 100 steps of 1 x 512 tokens,
    1e-3 gave the lowest perplexity; 3e-3 raised the loss in the first 20 steps)."""

    steps: int = 100
    lr: float = 1e-3
    lr_warmup: int = 5
    checkpoint_every: int = 10


def _codebook_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            qw = m.quantized_weight
            if qw.codebooks is not None and qw.outliers is None:
                out.append((name, m))
    return out


def _check_teacher(teacher: nn.Module, layers: list[tuple[str, QuantLinear]], model: nn.Module) -> None:
    """The teacher must be the model's float original: the same Linear at every quantized layer's name and
    the same output head (vocabulary); refused before any work, naming the first mismatch."""
    for name, ql in layers:
        try:
            lin = teacher.get_submodule(name)
        except AttributeError:
            lin = None
        shape = tuple(getattr(lin, "weight", torch.empty(0)).shape) if lin is not None else None
        if shape != (ql.out_features, ql.in_features):
            raise ValueError(f"the teacher is not this model's float original: layer {name!r} is "
                             f"{'missing' if shape is None else list(shape)} there, "
                             f"[{ql.out_features}, {ql.in_features}] in the quantized model")
    heads = [getattr(m.get_output_embeddings(), "weight", None) if hasattr(m, "get_output_embeddings") else None
             for m in (teacher, model)]
    if all(h is not None for h in heads) and heads[0].shape != heads[1].shape:
        raise ValueError(f"the teacher's output head is {list(heads[0].shape)}, the quantized model's "
                         f"{list(heads[1].shape)}: not the same vocabulary")


def finetune_codebooks(teacher: nn.Module, model: nn.Module, tokens: torch.Tensor, config: CodebookFinetuneConfig,
                       *, checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                       show_progress: bool = True, log: Callable[[dict[str, Any]], None] | None = None,
                       ) -> tuple[nn.Module, dict[str, Any]]:
    """Distill a copy of the code-book-quantized ``model`` from the float ``teacher`` on ``tokens``
    (1-D ids); neither is changed. Returns ``(tuned, info)``: ``tuned`` has ``QuantLinear`` layers of
    the same layout (code books and scales float16, codes unchanged) and ``model``'s record with
    ``extra["global_finetune"]`` (config, steps, losses, seconds); ``info`` as ``distill``'s.
    A run cut short by ``stop_after`` returns the state reached (resume with the same
    ``checkpoint_dir``)."""
    record = get_record(model)
    if record is None:
        raise ValueError("fine-tune a model quantized by polyquant (a code-book method such as aqlm)")
    if get_record(teacher) is not None:
        raise ValueError("the teacher must be the float model, not a quantized one")
    student = copy.deepcopy(model)
    layers = _codebook_layers(student)
    if not layers:
        raise ValueError(f"the model ({record.method}) has no code-book layer to fine-tune; "
                         "global fine-tuning applies to aqlm models")
    _check_teacher(teacher, layers, model)
    for p in student.parameters():
        p.requires_grad_(False)
    kept: dict[str, tuple[str, Any, str]] = {}
    for name, ql in layers:
        kept[name] = (ql._kernel_request, ql.act_quant, ql.method)
        bias = None if ql.bias is None else ql.bias.detach()
        replace_module(student, name, TrainableAQLM(ql.quantized_weight, bias))
    if config.train_norms:
        set_norms_trainable(student, skip=(TrainableAQLM,))
    info = distill(teacher, student, tokens, config, checkpoint_dir=checkpoint_dir, stop_after=stop_after,
                   show_progress=show_progress, log=log, desc="finetune-codebooks",
                   meta_extra={"modules": list(kept)})
    for name, (kernel, act, method) in kept.items():
        m = student.get_submodule(name)
        replace_module(student, name, QuantLinear(m.export(), None if m.bias is None else m.bias.detach(),
                                                  kernel=kernel, act_quant=act, method=method))
    for p in student.parameters():
        p.requires_grad_(False)
    extra = dict(record.extra or {})
    extra["global_finetune"] = {"config": config.to_dict(), "step": info["step"], "done": info["done"],
                                "losses": info["losses"], "seconds": info["seconds"]}
    student.polyquant = dataclasses.replace(record, seconds=float(record.seconds) + info["seconds"], extra=extra)
    return student, info | {"modules": list(kept)}
