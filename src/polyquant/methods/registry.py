"""The method registry: name -> ``MethodSpec`` (config class, pure quantize function, traits).

Everything user-facing (CLI choices, ``polyquant methods``, the compatibility matrix, diagrams)
reads this table. Register with :func:`register_method`; names are never reused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from polyquant.methods.base import MethodConfig
from polyquant.methods.traits import Preset, Prior
from polyquant.registry import lookup
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["MethodSpec", "Preset", "Prior", "register_method", "get_method", "list_methods", "config_from_dict", "METHODS"]

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
        collect: the calibration statistics it needs: a name from ``polyquant.calibration.COLLECTORS``
            or a factory ``linear -> collector`` (None: the Hessian, for a method that needs data).
        quantize_block: the block hook of the sequential driver: ``(BlockJob) -> {name: QuantizedWeight}``
            quantizes a whole block at once (AWQ's scale search); None: Linear by Linear.
        block_tuner: ``config -> tuner or None``: block fine-tuning after a block's Linears are quantized
            Linear by Linear; the tuner, ``(TuneJob) -> {name: QuantizedWeight}``, gets the block, its
            quantized weights, the calibration inputs and the float block's outputs on them
            (:mod:`polyquant.calibration.tune`); None from the hook: no tuning with this config.
        act_rule: ``config -> activation rule or None``: the run-time activation quantization of
            every layer (an :class:`polyquant.activations.ActivationQuantizer`).
        layer_act_rule: ``(config, qw, act) -> (qw, act)``: per-layer activation parameters carried
            in ``qw.extras`` (e.g. static input scales measured during calibration).
        after_quantize: ``(model, config, calibration, names) -> None`` run on the quantized model
            (e.g. calibrating static activation scales).
        presets: the named settings ``compare`` runs by default (none: one run at the defaults).
        order: where its presets stand in the default sweep and in tables (lower first, then name).
        priors: the expected perplexity increase of its settings, for the advisor (with sources).
        memory_factor: peak resident memory of an in-memory quantization as a multiple of the float
            model's float32 bytes (the automatic choice of streaming streams when that would not
            fit). 2.0 unless measured: on the 1.5B benchmark model RTN peaked at 1.6x, GPTQ at 1.7x.
        extra: anything else, method-specific (the keys above given in ``extra`` are moved to
            their fields).
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
    collect: str | Callable[[Any], Any] | None = None
    quantize_block: Callable[[Any], dict[str, QuantizedWeight]] | None = None
    block_tuner: Callable[[Any], Callable[[Any], dict[str, QuantizedWeight]] | None] | None = None
    act_rule: Callable[[Any], Any] | None = None
    layer_act_rule: Callable[..., tuple[QuantizedWeight, Any]] | None = None
    after_quantize: Callable[..., None] | None = None
    presets: tuple[Preset, ...] = ()
    priors: tuple[Prior, ...] = ()
    order: int = 1000
    memory_factor: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        extra = dict(self.extra)
        for key, name in _EXTRA_FIELDS.items():  # the untyped spellings of earlier registrations
            if key in extra:
                if getattr(self, name) is not None:
                    raise ValueError(f"method {self.name!r}: {name} given twice (field and extra[{key!r}])")
                object.__setattr__(self, name, extra.pop(key))
        object.__setattr__(self, "extra", extra)
        for name in ("quantize_block", "block_tuner", "act_rule", "layer_act_rule", "after_quantize"):
            v = getattr(self, name)
            if v is not None and not callable(v):
                raise ValueError(f"method {self.name!r}: {name} must be callable, got {v!r}")
        presets = tuple(self.presets)
        if any(not isinstance(p, Preset) for p in presets):
            raise ValueError(f"method {self.name!r}: presets must be Preset objects")
        if len({p.name for p in presets}) != len(presets):
            raise ValueError(f"method {self.name!r}: preset names repeat")
        object.__setattr__(self, "presets", presets)
        priors = tuple(self.priors)
        if any(not isinstance(p, Prior) for p in priors):
            raise ValueError(f"method {self.name!r}: priors must be Prior objects")
        object.__setattr__(self, "priors", tuple(dataclasses.replace(p, method=self.name) for p in priors))
        f = self.memory_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 1.0 <= f < 100:
            raise ValueError(f"method {self.name!r}: memory_factor must be a number in [1, 100), got {f!r}")

    @property
    def default_format(self) -> str:
        return self.formats[0]

    def collects(self) -> str | Callable[[Any], Any]:
        """The statistics collector the sequential driver builds for this method."""
        return self.collect if self.collect is not None else "hessian"


#: ``extra`` keys of earlier registrations -> the typed field that holds them now
_EXTRA_FIELDS = {"collect": "collect", "quantize_block": "quantize_block", "act_quant": "act_rule",
                 "layer_act_quant": "layer_act_rule", "after_quantize": "after_quantize"}


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
    return lookup(METHODS, name, "method")


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
