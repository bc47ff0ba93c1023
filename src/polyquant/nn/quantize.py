"""Module surgery for quantized models: the record of what was quantized (``QuantRecord``, attached
as ``model.polyquant``), swapping a Linear for a ``QuantLinear`` built from a method's result
(:func:`make_quant_linear`), and kernel (re)selection over a model (:func:`set_kernels`).

``quantize_model`` (walk, quantize, swap, record) is :mod:`polyquant.methods.apply`: it drives the
methods and the calibration driver, which sit above this layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from polyquant.nn.quant_linear import QuantLinear

__all__ = ["QuantRecord", "replace_module", "get_record", "set_kernels", "make_quant_linear", "kernel_summary",
           "module_device"]


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


def module_device(m: nn.Module) -> torch.device:
    """Where ``m`` computes: its first parameter's device, else its first buffer's, else the CPU."""
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


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


def make_quant_linear(spec, config: Any, qw, lin: nn.Linear, kernel: str = "auto") -> QuantLinear:
    """The ``QuantLinear`` of one quantized Linear, with the method's activation rule (``spec`` is the
    method's ``MethodSpec``: ``act_rule`` / ``layer_act_rule``)."""
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


