"""``quantize_model``: walk a model, quantize the selected Linears with a method, swap in
``QuantLinear`` modules, and record what was done (``model.polyquant``).

Calibration-free methods quantize each Linear independently here; methods that need data are
handed to the sequential calibration driver (``polyquant.calibration``).
"""
from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn

from polyquant.calibration import run_sequential
from polyquant.methods.base import MethodConfig
from polyquant.methods.registry import get_method
from polyquant.nn.quantize import QuantRecord, _untie_if_needed, get_record, make_quant_linear, replace_module, set_kernels
from polyquant.nn.select import select_linears
from polyquant.progress import progress

__all__ = ["quantize_model"]


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
