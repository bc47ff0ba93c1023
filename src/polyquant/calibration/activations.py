"""The calibration pass of static activation rules: run calibration windows through a quantized
model while every optimum-quanto rule (:class:`polyquant.activations.quanto.QuantoActivation`)
updates its input/output scales with quanto's rule (:func:`polyquant.activations.quanto.calibrating`)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from polyquant.activations.quanto import QuantoActivation, calibrating, parents
from polyquant.calibration.data import as_samples
from polyquant.calibration.driver import Calibration
from polyquant.progress import progress

__all__ = ["calibrate_activations"]


def calibrate_activations(model: nn.Module, calibration: Any, show_progress: bool = False) -> int:
    """Run ``calibration`` (token windows, see :func:`polyquant.calibration.data.as_samples`) through
    ``model`` and update every :class:`QuantoActivation`'s input/output scales with quanto's rule.
    Returns the number of layers calibrated."""
    if isinstance(calibration, Calibration):
        calibration = calibration.samples
    samples = as_samples(calibration)
    rules = [(m, m.act_quant) for m in model.modules() if isinstance(getattr(m, "act_quant", None), QuantoActivation)]
    if not rules:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), calibrating(rules, parents(model, rules)):
            for s in progress(samples, desc="quanto calibration", enabled=show_progress):
                model(**{k: v.to(device) for k, v in s.items()}, use_cache=False)
    finally:
        model.train(was_training)
    missing = [type(m).__name__ for m, r in rules if not r.calibrated]
    if missing:
        warnings.warn(f"{len(missing)} layer(s) saw no calibration input and keep dynamic activation scales",
                      stacklevel=2)
    return len(rules)
