"""The typed description of an activation rule (:class:`ActRule`), the base of every rule
(:class:`ActivationQuantizer`) and the rule registry (``ACT_RULES``).

An activation rule quantizes a Linear's input at run time. Its *description* says what it computes
- dtype (``int8``, ``float8_e4m3fn``, ``intN``), granularity (``token`` / ``tensor`` / ``group``
with ``group_size``), dynamic or static (calibrated scales), symmetric or not, LLM.int8's outlier
threshold, clamp bounds on the absmax, and the recipe (whose scale arithmetic it reproduces,
bit for bit). Kernels declare the rules they compute natively by matching fields of the
description (``Kernel.act_rules``); methods produce rules; formats save and rebuild them
(``to_dict`` / :func:`act_from_dict`).

Adding a rule: subclass :class:`ActivationQuantizer` (an ``nn.Module``), set ``kind``, implement
``forward`` (the reference fake quantization: what the matmul sees), ``quantize`` when a kernel
consumes the codes, ``rule`` (the description) and ``from_rule`` (rebuild from it), and decorate
the class with :func:`register_act_rule`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from polyquant.registry import add_entry

__all__ = ["ActRule", "ActivationQuantizer", "ACT_RULES", "register_act_rule", "rule_of", "act_from_dict",
           "GRANULARITIES"]

GRANULARITIES = ("token", "tensor", "group")


@dataclass(frozen=True)
class ActRule:
    """What an activation rule computes (no tensors: static scales live on the rule object).

    Attributes:
        kind: the registered rule (``ACT_RULES`` key): which arithmetic, e.g. ``int8-dynamic``.
        dtype: code type: ``int8``, ``float8_e4m3fn`` or ``int<N>``.
        granularity: ``token`` (one scale per row), ``tensor`` or ``group`` (per token and group
            of ``group_size`` input channels).
        group_size: input channels per scale for ``group``; None otherwise.
        dynamic: scales from each call's input (True) or calibrated, stored scales (False).
        symmetric: no zero point.
        outlier_threshold: LLM.int8's outlier magnitude (None: no decomposition).
        clamp: ``(lower, upper)`` bounds applied to the absmax before the scale (None: none).
        recipe: the reference whose scale arithmetic is reproduced (``bitsandbytes``, ``torchao``,
            ``fbgemm``, ``deepseek``, ``compressed-tensors``, ``quanto``).
        options: rule-specific settings that change the numbers (e.g. the cast dtype), as strings.
    """

    kind: str
    dtype: str
    granularity: str = "token"
    group_size: int | None = None
    dynamic: bool = True
    symmetric: bool = True
    outlier_threshold: float | None = None
    clamp: tuple[float | None, float | None] | None = None
    recipe: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(f"group_size must be set exactly for the group granularity, got {self.group_size!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.outlier_threshold is not None and not (self.outlier_threshold > 0 and math.isfinite(self.outlier_threshold)):
            raise ValueError(f"outlier_threshold must be a positive finite number or None, got {self.outlier_threshold!r}")

    def matches(self, pattern: dict[str, Any]) -> bool:
        """Every field named in ``pattern`` equals (or, for a tuple/set value, is one of) this one's."""
        for k, want in pattern.items():
            have = getattr(self, k)
            if isinstance(want, (tuple, set, frozenset)) and not isinstance(have, tuple):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clamp"] = list(self.clamp) if self.clamp is not None else None
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActRule":
        if not isinstance(d, dict):
            raise ValueError(f"an activation rule must be a dict, got {d!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown activation rule fields: {sorted(unknown)}")
        d = dict(d)
        if d.get("clamp") is not None:
            d["clamp"] = tuple(d["clamp"])
        d["options"] = tuple(sorted((str(k), str(v)) for k, v in (d.get("options") or {}).items()))
        return cls(**d)


class ActivationQuantizer(nn.Module):
    """Base of every activation rule: ``forward(x)`` is the reference fake quantization."""

    kind: ClassVar[str] = ""

    @property
    def rule(self) -> ActRule:
        raise NotImplementedError

    @classmethod
    def from_rule(cls, rule: ActRule, **tensors: torch.Tensor) -> "ActivationQuantizer":
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt from its description")

    def to_dict(self) -> dict[str, Any]:
        return self.rule.to_dict()

    def _fake_quant_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``q * scale`` of :meth:`quantize` over ``x`` seen as rows ``[-1, K]``, in ``x``'s dtype
        (the reference path of a rule whose ``quantize`` returns codes and float32 scales)."""
        shape = x.shape
        q, scale = self.quantize(x.reshape(-1, shape[-1]))
        return (q.to(torch.float32) * scale).to(x.dtype).reshape(shape)


ACT_RULES: dict[str, type] = {}


def register_act_rule(cls: type) -> type:
    """Class decorator: add a rule to ``ACT_RULES`` under its ``kind`` (names are never reused)."""
    return add_entry(ACT_RULES, getattr(cls, "kind", ""), cls, "activation rule")


def rule_of(act: Any) -> ActRule | None:
    """The description of a layer's ``act_quant`` (None for none, or a callable without one)."""
    if act is None:
        return None
    r = getattr(act, "rule", None)
    return r if isinstance(r, ActRule) else None


def act_from_dict(d: dict[str, Any], **tensors: torch.Tensor) -> ActivationQuantizer:
    """Rebuild a rule from ``to_dict()`` output (and its static scales, if any)."""
    rule = ActRule.from_dict(d)
    try:
        cls = ACT_RULES[rule.kind]
    except KeyError:
        raise ValueError(f"unknown activation rule {rule.kind!r}; known: {sorted(ACT_RULES)}") from None
    return cls.from_rule(rule, **tensors)
