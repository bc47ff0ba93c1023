"""The run list of a sweep, from the method registry: :class:`Run`, the default sweep (every
registered method at its presets, ``MethodSpec.presets``) and the bits x group-size grid
(:func:`build_runs`), and which runs get calibration windows (:func:`uses_calibration`)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from polyquant.methods import MethodConfig

__all__ = ["Run", "HEADLINE", "headline", "build_runs", "default_runs", "run_name", "uses_calibration"]


def headline() -> list[tuple[str, str, dict[str, Any]]]:
    """The default sweep, read from the method registry: ``(run name, method, config fields)`` for
    each preset of every registered method (``MethodSpec.presets``, methods in ``MethodSpec.order``).
    Methods without presets run once with their config's defaults (named after the method);
    presets with ``sweep=False`` run only when their method is named."""
    from polyquant.methods import METHODS
    specs = sorted(METHODS.values(), key=lambda sp: (sp.order, sp.name))
    return [(p.name, sp.name, dict(p.fields)) for sp in specs for p in sp.presets if p.sweep]


def __getattr__(name: str) -> Any:
    if name == "HEADLINE":  # the registry's presets, as the table this module once held
        return headline()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Run:
    """One entry of a sweep: ``config=None`` is the unquantized baseline."""

    name: str
    config: MethodConfig | None = None

    @property
    def method(self) -> str:
        return self.config.method if self.config is not None else "fp32"

    @property
    def setting(self) -> str:
        return self.config.describe() if self.config is not None else "unquantized"


def run_name(config: MethodConfig) -> str:
    """A file-name-safe run name from a config's label (``rtn w4 g64 sym`` -> ``rtn-w4-g64-sym``),
    prefixed with the method name when the label does not start with it."""
    slug = re.sub(r"[^a-z0-9.]+", "-", config.describe().lower()).strip("-")
    return slug if slug.startswith(config.method) else f"{config.method}-{slug}"


def _int_list(field_name: str, values: Iterable[Any] | None, allow_minus_one: bool = False) -> list[int] | None:
    if values is None:
        return None
    out: list[int] = []
    for v in values:
        ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or (allow_minus_one and v == -1))
        if not ok:
            what = "positive integers or -1 (per channel)" if allow_minus_one else "positive integers"
            raise ValueError(f"{field_name} must be {what}, got {v!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"{field_name} must not be empty")
    return out


def _method_names(methods: Iterable[str] | None) -> list[str]:
    from polyquant.methods import METHODS
    if methods is None:
        return sorted(METHODS, key=_headline_order)
    names: list[str] = []
    for m in methods:
        if not isinstance(m, str) or not m.strip():
            raise ValueError(f"methods must be method names, got {m!r}")
        m = m.strip()
        if m == "fp32":
            continue  # the baseline is always run
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; known methods: fp32, {', '.join(sorted(METHODS))}")
        if m not in names:
            names.append(m)
    return names


def _headline_order(method: str) -> tuple[int, str]:
    from polyquant.methods import METHODS
    spec = METHODS.get(method)
    has = spec is not None and bool(spec.presets)
    return (spec.order if has else 10**9, method)


def _config_fields(cls: type) -> dict[str, Any]:
    """Field name -> default of a config dataclass (``MISSING`` when it has none)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = dataclasses.MISSING
    return out


def build_runs(methods: Iterable[str] | None = None, bits: Iterable[int] | None = None,
               group_sizes: Iterable[int] | None = None, *, baseline: bool = True
               ) -> tuple[list[Run], list[dict[str, str]]]:
    """The run list of a sweep, from the method registry; returns ``(runs, skipped)``.

    With neither ``bits`` nor ``group_sizes``: every method of ``methods`` (default: every
    registered method) at its presets (``MethodSpec.presets``; the config's defaults for a
    method without an entry). With either: a grid per method of ``bits`` (those in the method's
    registry ``bits``; default: its headline bits) x ``group_sizes`` (for methods whose config has
    a ``group_size``; default: its headline group sizes), other fields at the config's defaults. A
    method without a ``bits`` field runs at its fixed width when that width was asked for.
    Combinations the config refuses (its ``ValueError``) and duplicates of an earlier setting are
    left out and listed in ``skipped`` (``method``, ``setting``, ``reason``). The unquantized
    baseline ``fp32`` comes first when ``baseline``.
    """
    from polyquant.methods import METHODS
    names = _method_names(methods)
    bits_l = _int_list("bits", bits)
    groups_l = _int_list("group_sizes", group_sizes, allow_minus_one=True)
    runs: list[Run] = [Run("fp32")] if baseline else []
    skipped: list[dict[str, str]] = []
    seen: dict[tuple[str, str], str] = {}
    used: set[str] = {r.name for r in runs}

    def add(name: str | None, cls: type, values: dict[str, Any], label: str) -> None:
        try:
            cfg = cls(**values)
        except (ValueError, TypeError) as e:
            skipped.append({"method": cls.method, "setting": label, "reason": str(e)})
            return
        keys = [(cfg.method, json.dumps(cfg.to_dict(), sort_keys=True, default=str)), (cfg.method, cfg.describe())]
        twin = next((seen[k] for k in keys if k in seen), None)
        if twin is not None:  # e.g. a group size asked of a width that has no groups
            skipped.append({"method": cfg.method, "setting": label, "reason": f"same setting as run {twin}"})
            return
        name = name or run_name(cfg)
        base, i = name, 2
        while name in used:
            name, i = f"{base}-{i}", i + 1
        used.add(name)
        seen.update({k: name for k in keys})
        runs.append(Run(name, cfg))

    named = methods is not None
    for m in names:
        spec = METHODS[m]
        cls = spec.config_cls
        presets = [p for p in spec.presets if named or p.sweep]
        if spec.presets and not presets:  # every preset opt-in: the method runs when it is named
            skipped.append({"method": m, "setting": ", ".join(p.name for p in spec.presets),
                            "reason": f"not in the default sweep (slow on a CPU); run it with --methods {m}"})
            continue
        heads = [(p.name, dict(p.fields)) for p in presets] or [(m, {})]
        if bits_l is None and groups_l is None:
            for n, f in heads:
                add(n, cls, dict(f), " ".join(f"{k}={v}" for k, v in f.items()) or "defaults")
            continue
        fields = _config_fields(cls)
        if "bits" in fields:
            head_bits = list(dict.fromkeys(f.get("bits", fields["bits"]) for _, f in heads))
            bit_axis: list[Any] = head_bits if bits_l is None else [b for b in bits_l if b in spec.bits]
            for b in bits_l or []:
                if b not in spec.bits:
                    skipped.append({"method": m, "setting": f"bits={b}",
                                    "reason": f"{m} supports bits {', '.join(map(str, spec.bits))} only"})
        else:
            if bits_l is not None and not set(bits_l) & set(spec.bits):
                skipped.append({"method": m, "setting": "bits=" + ",".join(map(str, bits_l)),
                                "reason": f"{m} is {', '.join(map(str, spec.bits))}-bit only"})
                continue
            bit_axis = [None]
        if "group_size" in fields:
            head_groups = list(dict.fromkeys(f.get("group_size", fields["group_size"]) for _, f in heads))
            group_axis: list[Any] = head_groups if groups_l is None else groups_l
        else:
            group_axis = [None]
        for b in bit_axis:
            for g in group_axis:
                values = {k: v for k, v in (("bits", b), ("group_size", g)) if v is not None}
                add(None, cls, values, " ".join(f"{k}={v}" for k, v in values.items()) or "defaults")
    return runs, skipped


def default_runs() -> list[Run]:
    """The default sweep: fp32, then every registered method at its headline setting(s)."""
    return build_runs()[0]


def uses_calibration(config: MethodConfig) -> bool:
    """Whether a run of ``config`` is given the sweep's calibration windows: methods that need
    data, and methods whose ``after_quantize`` calibrates static activation scales (quanto with
    ``activations`` other than ``none``)."""
    from polyquant.methods import get_method
    spec = get_method(config.method)
    if spec.needs_calibration:
        return True
    return callable(spec.after_quantize) and getattr(config, "activations", "none") not in ("none", None)
