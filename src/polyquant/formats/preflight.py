"""Check a quantization plan before any work: method config x model shapes x format x kernel.

``check_plan`` makes one pass over the shapes of the Linears a config selects: for each distinct
``(out_features, in_features)`` it quantizes a cheap stand-in weight of that shape with the method
itself (random values; calibration methods get statistics from their own collector fed random
inputs), builds the layer the method would build, and asks the kernel (``supports``) and the
format (``check_layer``) whether they take it. Every refusal the real run would meet at its end
(a group size that does not divide ``in_features`` for the format, a kernel that cannot run the
layout, a width the format cannot pack) is found in seconds, by the same code that would refuse it
later. Nothing here knows a method, format or kernel by name.

``plan_config`` adds per-model defaults: when the config's granularity field (``group_size``) was
not set by the user and its default does not fit the model, smaller groups (halving, down to 16)
and then per-channel (-1) are tried, and the first that passes is used, with a note saying so.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from polyquant.formats.base import get_format
from polyquant.methods.base import MethodConfig
from polyquant.methods.registry import get_method

__all__ = ["Problem", "linear_shapes", "check_plan", "plan_config", "PlanError", "GRANULARITY_FIELDS"]

#: config fields that set the weight granularity, tried smaller when the default does not fit a model
GRANULARITY_FIELDS = ("group_size",)
_MAX_STANDIN = 1 << 16  # values per stand-in weight; taller layers keep out_features mod 256


class PlanError(ValueError):
    """The plan cannot work; the message names the layer, the reason and the fix."""


@dataclass(frozen=True)
class Problem:
    layer: str            # the first Linear of that shape
    shape: tuple[int, int]
    stage: str            # "method", "kernel" or "format"
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: layer {self.layer!r} [{self.shape[0]}x{self.shape[1]}]: {self.reason}"


def linear_shapes(model: nn.Module, config: MethodConfig) -> dict[tuple[int, int], str]:
    """Distinct ``(out, in)`` shapes of the Linears ``config`` selects -> the first such layer."""
    from polyquant.nn.select import select_linears
    targets = select_linears(model, config.include, config.exclude, config.quantize_lm_head)
    if not targets:
        raise PlanError("no Linear layer matched the include/exclude patterns")
    shapes: dict[tuple[int, int], str] = {}
    for name, lin in targets:
        shapes.setdefault((int(lin.out_features), int(lin.in_features)), name)
    return shapes


def _rows(out: int, inp: int) -> int:
    if out * inp <= _MAX_STANDIN:
        return out
    return 256 + out % 256  # same residues for every divisibility check up to 256


def _stand_in(spec, config: MethodConfig, out: int, inp: int, bias: bool, gen: torch.Generator):
    rows = _rows(out, inp)
    lin = nn.Linear(inp, rows, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, inp, generator=gen) * 0.02)
        if bias:
            lin.bias.zero_()
    stats = None
    if spec.needs_calibration:
        from polyquant.calibration.stats import collector_factory
        collector = collector_factory(spec)(lin)
        collector.add(torch.randn(2, 32, inp, generator=gen))
        stats = dict(collector.result())
    return lin, spec.quantize_weight(lin.weight.data, config, stats)


def check_plan(model: nn.Module, config: MethodConfig, format: str | None = None, kernel: str = "auto",
               device: str | torch.device = "cpu", shapes: dict[tuple[int, int], str] | None = None
               ) -> list[Problem]:
    """Every reason the plan would fail, one per distinct shape (empty: it can run and be saved).

    ``format``: the checkpoint format (default: the method's default format; None or "" skips
    the format check only when the method has no format, which a registered method always has).
    """
    from polyquant.nn.quantize import QuantRecord, make_quant_linear

    spec = get_method(config.method)
    fmt = get_format(format or spec.default_format)
    shapes = linear_shapes(model, config) if shapes is None else shapes
    modules = dict(model.named_modules())
    owner = types.SimpleNamespace(polyquant=QuantRecord(spec.name, config.to_dict(), sorted(shapes.values())),
                                  config=getattr(model, "config", None))
    try:
        fmt = fmt.for_model(owner)
    except ValueError as e:
        first = next(iter(shapes.values()))
        return [Problem(first, next(iter(shapes)), "format", str(e))]
    gen = torch.Generator().manual_seed(0)
    problems: list[Problem] = []
    for (out, inp), name in shapes.items():
        bias = getattr(modules.get(name), "bias", None) is not None
        try:
            lin, qw = _stand_in(spec, config, out, inp, bias, gen)
        except Exception as e:  # noqa: BLE001 - the method's own refusal, reported as such
            problems.append(Problem(name, (out, inp), "method", " ".join(str(e).split()) or type(e).__name__))
            continue
        try:
            layer = make_quant_linear(spec, config, qw, lin)
        except Exception as e:  # noqa: BLE001
            problems.append(Problem(name, (out, inp), "method", " ".join(str(e).split()) or type(e).__name__))
            continue
        qw = layer.quantized_weight  # as the layer holds it (a method may move extras into its activation rule)
        if kernel != "auto":
            from polyquant.kernels import select_kernel
            try:
                select_kernel(qw, torch.device(device), kernel, act_quant=layer.act_quant)
            except ValueError as e:
                problems.append(Problem(name, (out, inp), "kernel", str(e)))
                continue
        reason = fmt.check_layer(name, qw, layer)
        if reason:
            problems.append(Problem(name, (out, inp), "format", f"format {fmt.name!r} cannot store it: {reason}"))
    return problems


def _candidates(value: Any) -> Iterable[int]:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return []
    out, v = [], value // 2
    while v >= 16:
        out.append(v)
        v //= 2
    return out + [-1]


def plan_config(model: nn.Module, config: MethodConfig, explicit: Iterable[str] = (), format: str | None = None,
                kernel: str = "auto", device: str | torch.device = "cpu") -> tuple[MethodConfig, list[str]]:
    """``config`` checked against ``model`` (see :func:`check_plan`), with the granularity default
    adapted to the model where the user did not set it (``explicit``: the fields the user set).
    Returns ``(config, notes)``; raises :class:`PlanError` with the reasons and the fix."""
    adapt = get_method(config.method).extra.get("for_format")  # the method's per-format defaults
    notes: list[str] = []
    if callable(adapt):
        config, notes = adapt(config, format or get_method(config.method).default_format, set(explicit))
    shapes = linear_shapes(model, config)
    problems = check_plan(model, config, format, kernel, device, shapes)
    if not problems:
        return config, notes
    explicit = set(explicit)
    fields = {f.name for f in dataclasses.fields(config)}
    for fname in GRANULARITY_FIELDS:
        if fname not in fields or fname in explicit:
            continue
        current = getattr(config, fname)
        for cand in _candidates(current):
            try:
                trial = config.replace(**{fname: cand})
            except (ValueError, TypeError):
                continue
            if not check_plan(model, trial, format, kernel, device, shapes):
                ins = sorted({i for _, i in shapes})
                why = problems[0].reason
                return trial, notes + [f"{fname} {current} does not fit this model (in_features {', '.join(map(str, ins))}: "
                               f"{why}); using {fname} {cand} (set --{fname.replace('_', '-')} to choose)"]
    raise PlanError(_explain(config, problems, format, explicit))


def _explain(config: MethodConfig, problems: list[Problem], format: str | None, explicit: set[str]) -> str:
    spec = get_method(config.method)
    fmt = format or spec.default_format
    head = "; ".join(str(p) for p in problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    fixes = []
    stages = {p.stage for p in problems}
    ins = sorted({p.shape[1] for p in problems})
    if "group_size" in {f.name for f in dataclasses.fields(config)} and ("format" in stages or "method" in stages):
        fixes.append(f"a --group-size that divides in_features {', '.join(map(str, ins))} (or -1: per channel)")
    if "format" in stages and len(spec.formats) > 1:
        fixes.append(f"another --format ({', '.join(f for f in spec.formats if f != fmt)})")
    if "kernel" in stages:
        fixes.append("--kernel auto")
    suffixes = sorted({p.layer.rsplit(".", 1)[-1] for p in problems})
    fixes.append(f"keep those layers in float (--exclude '({'|'.join(suffixes)})$')")
    fix = (" Fix: " + ", or ".join(fixes) + ".") if fixes else ""
    return f"{config.describe()} cannot quantize and save this model as {fmt}: {head}.{fix}"
