"""Typed traits a method registers with its ``MethodSpec``: named presets (the rows ``compare``
runs by default) and advisor priors (the perplexity increase expected of a setting, with where the
number comes from).

Sources of priors are things that ship with polyquant (``benchmarks/README.md``, the README) or
public papers; an ``assumed: ...`` source says that no measurement stands behind the number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "Prior", "FP32_PPL", "BENCH", "rel"]

#: fp32 perplexity of the default model (SmolLM2-135M, 40 x 512 pydoc windows) in benchmarks/README.md
FP32_PPL = 14.007
BENCH = "benchmarks/README.md (SmolLM2-135M, 40 x 512 pydoc windows)"


def rel(ppl: float, base: float = FP32_PPL) -> float:
    """A measured perplexity as an increase over fp32 (a fraction, rounded to 4 places)."""
    return round(ppl / base - 1, 4)


@dataclass(frozen=True)
class Preset:
    """A named setting of a method: ``name`` is the run name in a sweep, ``fields`` the config
    fields that differ from the config's defaults. ``sweep``: whether ``compare`` runs it without
    ``--methods`` (False for settings that take far longer than the rest on a CPU, such as AQLM's
    code book search: they run when their method is named)."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    sweep: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"preset name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.fields, dict):
            raise ValueError(f"preset {self.name}: fields must be a dict, got {self.fields!r}")
        if not isinstance(self.sweep, bool):
            raise ValueError(f"preset {self.name}: sweep must be a bool, got {self.sweep!r}")


@dataclass(frozen=True)
class Prior:
    """A perplexity increase (a fraction: 0.05 is +5 %) expected of a setting. ``bits``: None
    (any); ``group``: ``pc`` (per channel), ``g64`` ..., or None (any); ``sym``: None (any).
    ``method`` is filled in by the registry from the spec that lists the prior."""

    bits: int | None
    group: str | None
    sym: bool | None
    ppl_increase: float
    source: str
    method: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("a prior needs its source")
        if not (isinstance(self.ppl_increase, (int, float)) and self.ppl_increase > -1):
            raise ValueError(f"ppl_increase must be a number > -1, got {self.ppl_increase!r}")
