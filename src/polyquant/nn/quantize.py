"""``quantize_model``: walk a model, quantize the selected Linears with a method, swap in
``QuantLinear`` modules, and record what was done (``model.polyquant``).

Calibration-free methods quantize each Linear independently here; methods that need data are
handed to the sequential calibration driver (``polyquant.calibration``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyquant.methods import get_method
from polyquant.methods.base import MethodConfig
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.select import select_linears
from polyquant.progress import progress

__all__ = ["quantize_model", "QuantRecord", "replace_module", "get_record", "set_kernels"]


@dataclass
class QuantRecord:
    """What was quantized and how: attached to the model as ``model.polyquant``."""

    method: str
    config: dict[str, Any]
    modules: list[str] = field(default_factory=list)
    format: str | None = None
    seconds: float = 0.0
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def get_record(model: nn.Module) -> QuantRecord | None:
    return getattr(model, "polyquant", None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _untie_if_needed(model: nn.Module, names: list[str]) -> None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not hasattr(model, "config"):
        return
    for n in names:
        if model.get_submodule(n) is out and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
            if hasattr(model, "_tied_weights_keys"):
                model._tied_weights_keys = None


def quantize_model(model: nn.Module, config: MethodConfig, calibration: Any = None, *, inplace: bool = False,
                   show_progress: bool = True, kernel: str = "auto") -> nn.Module:
    """Quantize ``model`` with ``config``; returns the quantized model.

    The source model is left untouched unless ``inplace=True``. ``kernel`` (a runtime choice,
    ``auto`` or a kernel name) runs the quantized layers; a name is recorded in
    ``model.polyquant.extra["kernel"]``.
    """
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config must be a polyquant method config, got {type(config).__name__}")
    spec = get_method(config.method)
    if get_record(model) is not None:
        raise ValueError("this model is already quantized by polyquant")
    if not inplace:
        model = copy.deepcopy(model)
    t0 = time.perf_counter()
    targets = select_linears(model, config.include, config.exclude, config.quantize_lm_head)
    if not targets:
        raise ValueError("no Linear layer matched the include/exclude patterns")
    names = [n for n, _ in targets]
    _untie_if_needed(model, names)
    extra: dict[str, Any] = {}
    if spec.needs_calibration:
        from polyquant.calibration import run_sequential  # the shared driver (data-dependent methods)
        summary = run_sequential(model, spec, config, targets, calibration, show_progress=show_progress)
        extra["calibration"] = {"autocast": summary.get("autocast"), "seconds": round(summary["seconds"], 2),
                                "resumed_blocks": summary.get("resumed_blocks", 0)}
    else:
        bar = progress(targets, desc=f"{spec.name}", enabled=show_progress)
        for name, lin in bar:
            bar.set_postfix_str(name)
            qw = spec.quantize_weight(lin.weight.data, config, None)
            replace_module(model, name, make_quant_linear(spec, config, qw, lin))
    if kernel != "auto":
        set_kernels(model, kernel)
        extra["kernel"] = kernel
    finish = spec.after_quantize
    if callable(finish):  # e.g. static activation scales calibrated on the quantized model
        finish(model, config, calibration, names)
    model.polyquant = QuantRecord(spec.name, config.to_dict(), names, seconds=time.perf_counter() - t0, extra=extra)
    return model


def make_quant_linear(spec, config: MethodConfig, qw, lin: nn.Linear, kernel: str = "auto") -> QuantLinear:
    act = spec.act_rule
    act_quant = act(config) if callable(act) else None
    bind = spec.layer_act_rule  # (config, qw, act) -> (qw, act): per-layer activation
    if callable(bind):                        # parameters carried in qw.extras (e.g. static input scales)
        qw, act_quant = bind(config, qw, act_quant)
    return QuantLinear(qw, lin.bias.data if lin.bias is not None else None, kernel=kernel,
                       act_quant=act_quant, method=spec.name)


def set_kernels(model: nn.Module, kernel: str = "auto") -> dict[str, int]:
    """Reselect kernels of every QuantLinear (after moving the model, or to force one).
    Returns how many layers use each kernel."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            name = m.set_kernel(kernel)
            counts[name] = counts.get(name, 0) + 1
    return counts


def kernel_summary(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[m.kernel_name] = counts.get(m.kernel_name, 0) + 1
    return counts


