"""Moved to :mod:`polyquant.activations.float8` (an activation rule, not a kernel); re-exported
here for existing imports."""
from polyquant.activations.float8 import FP8_MAX, Float8DynamicActivation, float8_codes, float8_scale

__all__ = ["Float8DynamicActivation", "float8_scale", "FP8_MAX", "float8_codes"]
