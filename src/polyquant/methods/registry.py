"""The method registry: name -> ``MethodSpec`` (config class, pure quantize function, traits).

Everything user-facing (CLI choices, ``polyquant methods``, the compatibility matrix, diagrams)
reads this table. Register with :func:`register_method`; names are never reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from polyquant.methods.base import MethodConfig
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods", "config_from_dict", "METHODS"]

QuantizeFn = Callable[[torch.Tensor, Any, "dict[str, torch.Tensor] | None"], QuantizedWeight]

FAMILIES = ("integer weight-only", "calibration-based", "codebook", "float8", "ternary")


@dataclass(frozen=True)
class MethodSpec:
    """Traits of one method.

    Attributes:
        name: CLI/registry name (``rtn``, ``gptq``, ``bnb-nf4`` ...).
        config_cls: the method's ``MethodConfig`` subclass.
        quantize_weight: pure function ``(weight [out, in] float, config, stats) -> QuantizedWeight``;
            ``stats`` holds calibration statistics (e.g. ``{"H": hessian}``) or is None.
        needs_calibration: whether the method needs data (the sequential driver provides it).
        family: one of ``FAMILIES`` (for the technique map).
        bits: the weight bit widths it supports.
        formats: on-disk formats that can store its result; the first is the default.
        activations: activation quantization it applies at run time (``none``, ``int8 dynamic`` ...).
        description: one line for tables.
        reference: paper / original library.
    """

    name: str
    config_cls: type[MethodConfig]
    quantize_weight: QuantizeFn
    needs_calibration: bool
    family: str
    bits: tuple[int, ...]
    formats: tuple[str, ...]
    activations: str = "none"
    description: str = ""
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_format(self) -> str:
        return self.formats[0]


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {spec.family!r}")
    if not spec.formats:
        raise ValueError(f"method {spec.name!r} must name at least one format")
    spec.config_cls.method = spec.name
    spec.config_cls.allowed_bits = tuple(spec.bits)  # configs refuse widths the method does not list
    METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """For tests and plugins that add a method temporarily."""
    METHODS.pop(name, None)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def list_methods() -> list[MethodSpec]:
    return [METHODS[k] for k in sorted(METHODS)]


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Rebuild a config from ``to_dict()`` output (unknown keys are refused by name)."""
    if "method" not in d:
        raise ValueError("config dict has no 'method' key")
    spec = get_method(d["method"])
    fields = {f for f in spec.config_cls.__dataclass_fields__}
    d = {k: v for k, v in d.items() if k != "kernel"}  # records before the kernel became a runtime choice
    unknown = set(d) - fields - {"method"}
    if unknown:
        raise ValueError(f"unknown {spec.name} config fields: {sorted(unknown)}")
    return spec.config_cls(**{k: v for k, v in d.items() if k != "method"})
