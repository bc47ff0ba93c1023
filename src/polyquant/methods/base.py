"""``MethodConfig``: the base of every method's config dataclass.

A config validates itself on construction (``ValueError`` naming the field, never ``assert``),
serializes to a plain dict (``to_dict``) with its method name, and is rebuilt by
``config_from_dict`` through the method registry (an allow-list: no arbitrary imports).
Layer selection lives here too, so a checkpoint records which modules were quantized.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["MethodConfig", "check_choice", "check_fraction", "check_int"]


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def check_fraction(name: str, value: Any, zero: bool = True) -> None:
    """``value`` a finite number in [0, 1) (in (0, 1) with ``zero=False``): tolerances, learning rates."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value < 1 or (not zero and value == 0):
        raise ValueError(f"{name} must be a number in {'[' if zero else '('}0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple | list) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class MethodConfig:
    """Common fields.

    Attributes:
        include: regexes of module names to quantize (default: every Linear inside the model's
            repeated blocks).
        exclude: regexes of module names to keep in float.
        quantize_lm_head: also quantize the output head (kept float by default).

    The kernel that runs the layers is a runtime choice, not part of a config
    (``polyquant.quantize(..., kernel=...)``, ``set_kernels``, ``load(..., kernel=...)``).
    A config with a ``bits`` field is checked against the widths its method registers
    (``MethodSpec.bits``, set on the class as ``allowed_bits`` by ``register_method``).
    """

    method: ClassVar[str] = ""
    allowed_bits: ClassVar[tuple[int, ...]] = ()
    #: the field that holds the weight's group size under its home library's name (``group_size``
    #: in GPTQ/AWQ/HQQ, ``blocksize`` in bitsandbytes, ``weight_block_size`` in fine-grained FP8,
    #: a ``[rows, cols]`` block); ``--group-size`` sets it. None: the method has no group size
    #: (per-tensor / per-channel scales, or a granularity named in words).
    group_field: ClassVar[str | None] = "group_size"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.include is not None and not isinstance(self.include, list):
            raise ValueError(f"include must be a list of regexes, got {self.include!r}")
        if not isinstance(self.exclude, list):
            raise ValueError(f"exclude must be a list of regexes, got {self.exclude!r}")
        self.validate()
        bits = getattr(self, "bits", None)
        if self.allowed_bits and isinstance(bits, int) and not isinstance(bits, bool) \
                and bits not in self.allowed_bits:
            raise ValueError(f"bits must be one of {list(self.allowed_bits)} for {self.method}, got {bits}")

    def validate(self) -> None:  # overridden by methods
        pass

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Short human label, e.g. ``rtn w4 g64 sym``."""
        return self.method
