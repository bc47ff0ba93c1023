"""The method advisor: which method and setting fit a memory budget on given hardware with the
least loss, and why.

This module owns :func:`recommend` (and its :class:`Recommendation` / :class:`Option` records)
and reads the prior table (each method's ``MethodSpec.priors``, :func:`priors`) used when no sweep
was measured; the model's size and the command line's limits are :mod:`polyquant.report.sizing`.

How an option is judged:

* **memory**: the bytes of the stored weights (what ``eval`` reports as ``weight_bytes``):
  measured in a sweep of the same model when there is one, else estimated as
  ``quantized params x bits per weight / 8 + other params x 4`` (polyquant keeps the rest in
  fp32), where bits per weight counts the codes, scales, zeros and extras of the method's own
  layout on a sample layer. Activations, the KV cache and kernel buffers come on top.
* **loss**: the perplexity increase over the unquantized model, measured (``ppl`` of a sweep
  record over the fp32 baseline of the same sweep) or, without a sweep, the prior table below.
  Measured options rank ahead of prior estimates.
* **hardware**: the kernel it runs with on that device class: what ran in the sweep when it ran
  on that device class, else the declared compatibility matrix (:mod:`polyquant.report.matrix`).
  An option no kernel runs there is rejected; one that only the reference kernel (or another
  slow path) runs is rejected unless ``allow_reference``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from polyquant.methods.traits import Prior
from polyquant.report.sizing import (FLOAT_BYTES, ModelSize, _count, _from_folder, _pct, format_bytes,  # noqa: F401
                                     model_size, parse_ppl_increase, parse_size)

__all__ = ["Prior", "PRIORS", "priors", "FALLBACK_BY_BITS", "ModelSize", "Option", "Recommendation", "model_size",
           "parse_size", "parse_ppl_increase", "format_bytes", "prior_for", "recommend", "load_results",
           "FLOAT_BYTES"]



# -- the prior table --------------------------------------------------------------------------
# Each method registers its priors (``MethodSpec.priors``, with their sources); this module reads
# them from the registry.


def priors() -> tuple[Prior, ...]:
    """Every registered method's priors (``MethodSpec.priors``), method by method."""
    from polyquant.methods import list_methods
    return tuple(p for spec in list_methods() for p in spec.priors)


def __getattr__(name: str) -> Any:
    if name == "PRIORS":  # the registry's priors, as the table this module once held
        return priors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: For a setting the table has no entry for: by weight bits (assumed, from the RTN numbers above
#: and the collapse of 2-bit round-to-nearest).
FALLBACK_BY_BITS: dict[int, float] = {8: 0.005, 6: 0.05, 5: 0.15, 4: 0.5, 3: 6.0, 2: 1e3, 1: 1e4}


def _group(config: Any) -> str | None:
    g = getattr(config, "group_size", None)
    if g is None:
        return None
    return "pc" if g == -1 else f"g{g}"


def prior_for(method: str, bits: int | None, group: str | None = None, sym: bool | None = None
              ) -> tuple[float, str]:
    """The expected perplexity increase (fraction) of a setting and where the number comes from:
    the most specific matching prior of the method's ``MethodSpec.priors``, else :data:`FALLBACK_BY_BITS`."""
    best, best_score = None, -1
    from polyquant.methods import METHODS
    spec = METHODS.get(method)
    for p in (spec.priors if spec is not None else ()):
        if p.method != method or (p.bits is not None and p.bits != bits):
            continue
        if p.group is not None and p.group != group:
            continue
        if p.sym is not None and p.sym != sym:
            continue
        score = sum(v is not None for v in (p.bits, p.group, p.sym))
        if score > best_score:
            best, best_score = p, score
    if best is not None:
        return best.ppl_increase, best.source
    b = bits if bits in FALLBACK_BY_BITS else min(FALLBACK_BY_BITS, key=lambda k: abs(k - (bits or 8)))
    return FALLBACK_BY_BITS[b], f"assumed: no entry for {method} w{bits}, fallback for {b}-bit weights"


# -- options ----------------------------------------------------------------------------------

@dataclass
class Option:
    """One candidate. ``evidence``: ``measured`` (a sweep record), ``prior`` (registry traits and
    ``MethodSpec.priors``) or ``exact`` (the unquantized model). ``ppl_increase`` is a fraction.
    ``rejected``: why it was not chosen (None for an acceptable option)."""

    method: str
    setting: str
    config: dict[str, Any] | None
    evidence: str
    weight_bytes: int
    bytes_note: str
    bits_per_weight: float | None
    ppl_increase: float | None
    ppl_note: str
    kernel: str | None
    fast: bool
    kernel_note: str
    ppl: float | None = None
    run: str | None = None
    rejected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        bpw = f", {self.bits_per_weight:.2f} bits/weight" if self.bits_per_weight else ""
        return (f"{self.method} [{self.setting}]: {format_bytes(self.weight_bytes)} ({self.bytes_note}{bpw}); "
                f"ppl {_pct(self.ppl_increase)} ({self.ppl_note}); kernel {self.kernel or 'none'} "
                f"({self.kernel_note})")


@dataclass
class Recommendation:
    """The advisor's answer. ``ok`` False is a refusal (``choice`` None, ``reason`` says why)."""

    ok: bool
    choice: Option | None
    reason: str
    model: str
    total_params: int
    quantized_params: int
    device: str
    capability: str | None
    memory_bytes: int
    max_ppl_increase: float | None
    evidence: str
    accepted: list[Option] = field(default_factory=list)
    rejected: list[Option] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choice"] = self.choice.to_dict() if self.choice else None
        return d

    def explain(self) -> str:
        lim = f", ppl increase at most {_pct(self.max_ppl_increase)}" if self.max_ppl_increase is not None else ""
        cap = f" (compute capability {self.capability})" if self.capability else ""
        out = [f"model {self.model}: {self.total_params / 1e6:.1f}M parameters, {self.quantized_params / 1e6:.1f}M "
               f"in quantizable layers; device {self.device}{cap}; memory budget {format_bytes(self.memory_bytes)}"
               f" for the weights{lim}", f"evidence: {self.evidence}", ""]
        if self.ok and self.choice is not None:
            out += [f"recommended: {self.choice.line()}", f"why: {self.reason}"]
        else:
            out += [f"no recommendation: {self.reason}"]
        if len(self.accepted) > 1 or (self.accepted and not self.ok):
            out += ["", "other options that qualify (best first):"]
            out += [f"  {o.line()}" for o in self.accepted if o is not self.choice]
        if self.rejected:
            out += ["", "rejected:"]
            out += [f"  {o.method} [{o.setting}] ({format_bytes(o.weight_bytes)}, ppl {_pct(o.ppl_increase)}, "
                    f"{o.evidence}): {o.rejected}" for o in self.rejected]
        return "\n".join(out)


# -- results ----------------------------------------------------------------------------------

def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A ``results.json`` payload from a file or the sweep folder holding it."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"results: no such file {p}")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"results: {p} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"results: {p} has no 'runs' list (not a polyquant compare results.json)")
    return data


def _records(results: Any) -> list[dict[str, Any]]:
    if results is None:
        return []
    if isinstance(results, (str, os.PathLike)):
        results = load_results(results)
    if isinstance(results, dict):
        if not isinstance(results.get("runs"), list):
            raise ValueError("results must be a list of run records or a results.json payload with 'runs'")
        results = results["runs"]
    if not isinstance(results, (list, tuple)) or not all(isinstance(r, dict) for r in results):
        raise ValueError("results must be a list of run records (dicts)")
    return list(results)


def _settings_key(rec: dict[str, Any]) -> str:
    return json.dumps(rec.get("settings"), sort_keys=True, default=str)


# -- the advisor ------------------------------------------------------------------------------

def _kernel_info(cell: dict[str, Any], dc_key: str) -> tuple[str | None, bool, str]:
    if cell["fast"]:
        k = cell["fast"][0]
        cap = cell["min_capability"].get(k)
        return k, True, "declared" + (f"; needs compute capability >= {cap}" if cap else "")
    if cell["slow"]:
        return cell["slow"][0], False, f"declared; only slow paths on {dc_key}: {', '.join(cell['slow'])}"
    if cell["reference"]:
        return "reference", False, f"declared; only the reference kernel on {dc_key} (dequantizes at every call)"
    return None, False, f"no kernel runs it on {dc_key}: {cell.get('reference_reason') or 'declined'}"


def _estimate_bytes(size: ModelSize, bpw: float) -> int:
    return int(math.ceil(size.quantized_params * bpw / 8 + size.float_params * size.float_bytes))


def _prior_options(size: ModelSize, dc, capability) -> list[Option]:
    from polyquant.methods import METHODS
    from polyquant.report.matrix import device_cell, representative_configs, sample_layer
    opts = []
    for name in sorted(METHODS):
        spec = METHODS[name]
        configs = [(b, c) for b, c, err in representative_configs(spec) if c is not None]
        if name == "rtn":  # the best 4-bit RTN setting measured (README): asymmetric groups
            try:
                configs.append((4, spec.config_cls(bits=4, group_size=64, sym=False)))
            except (ValueError, TypeError):
                pass
        for bits, cfg in configs:
            try:
                qw, act = sample_layer(cfg)
            except Exception:
                continue  # the matrix shows the error; nothing to advise
            bpw = qw.nbytes() * 8 / (qw.shape[0] * qw.shape[1])
            inc, src = prior_for(name, getattr(cfg, "bits", None) or qw.bits, _group(cfg), getattr(cfg, "sym", None))
            cell = device_cell(qw, act, dc, capability)
            kernel, fast, knote = _kernel_info(cell, dc.key)
            opts.append(Option(name, cfg.describe(), cfg.to_dict(), "prior", _estimate_bytes(size, bpw),
                               f"estimated for {size.name}", round(bpw, 3), inc, src, kernel, fast, knote,
                               rejected=None if kernel else knote))
    return opts


def _measured_options(records: list[dict[str, Any]], size: ModelSize, dc, capability
                      ) -> tuple[list[Option], Option | None]:
    from polyquant.kernels import KERNELS
    from polyquant.methods import config_from_dict
    from polyquant.report.matrix import device_cell, device_class, record_kernels, sample_layer
    baselines: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("config") is None and r.get("status") == "ok" and (r.get("metrics") or {}).get("ppl"):
            baselines.setdefault(_settings_key(r), r)
    opts: list[Option] = []
    fp_opt = None
    for r in records:
        metrics = r.get("metrics") or {}
        same_model = str(r.get("model")) == size.name
        if r.get("config") is None:
            if r.get("status") == "ok" and same_model and metrics.get("weight_bytes") and fp_opt is None:
                fp_opt = Option("fp32", "unquantized", None, "measured", int(metrics["weight_bytes"]),
                                f"measured in run {r.get('name')!r}", 32.0, 0.0,
                                f"the reference (ppl {metrics.get('ppl')})", "dense", True,
                                "plain torch Linear layers", ppl=metrics.get("ppl"), run=r.get("name"))
            continue
        name, setting = r.get("method") or r["config"].get("method"), r.get("setting") or ""
        try:
            cfg = config_from_dict(dict(r["config"]))
            qw, act = sample_layer(cfg)
            bpw = qw.nbytes() * 8 / (qw.shape[0] * qw.shape[1])
        except Exception as e:
            opts.append(Option(str(name), setting, r.get("config"), "measured", 0, "unknown", None, None, "", None,
                               False, "", run=r.get("name"),
                               rejected=f"cannot rebuild this record's config: {type(e).__name__}: {e}"))
            continue
        if same_model and metrics.get("weight_bytes"):
            nbytes, bnote = int(metrics["weight_bytes"]), f"measured in run {r.get('name')!r}"
        else:
            nbytes = _estimate_bytes(size, bpw)
            bnote = f"estimated for {size.name} (the sweep measured {r.get('model')})"
        base = baselines.get(_settings_key(r))
        ppl = metrics.get("ppl")
        if base is not None and ppl is not None:
            b = base["metrics"]["ppl"]
            inc, pnote = ppl / b - 1, f"measured: ppl {ppl:.3f} vs fp32 {b:.3f} in run {r.get('name')!r}"
        else:
            inc, pnote = None, "unknown: no fp32 baseline measured with the same settings"
        rec_dc = None
        try:
            rec_dc = device_class(str(r.get("device") or "cpu"))
        except ValueError:
            pass
        kernels = record_kernels(r) if r.get("status") == "ok" else {}
        if rec_dc is not None and rec_dc.key == dc.key and kernels:
            fast_k = [k for k in kernels if k in KERNELS and KERNELS[k].fast]
            ref_n = sum(n for k, n in kernels.items() if not (k in KERNELS and KERNELS[k].fast))
            total_n = sum(kernels.values())
            kernel = fast_k[0] if fast_k else sorted(kernels)[0]
            fast = bool(fast_k)
            knote = f"ran on {', '.join(f'{k} x{n}' for k, n in sorted(kernels.items()))} in the sweep"
            if fast and ref_n:
                knote += f" ({ref_n} of {total_n} layers on slow paths)"
        else:
            kernel, fast, knote = _kernel_info(device_cell(qw, act, dc, capability), dc.key)
        opt = Option(str(name), setting, r.get("config"), "measured", nbytes, bnote, round(bpw, 3), inc, pnote,
                     kernel, fast, knote, ppl=ppl, run=r.get("name"))
        if r.get("status") != "ok":
            opt.rejected = f"failed in the sweep: {r.get('error') or 'unknown error'}"
        elif kernel is None:
            opt.rejected = knote
        opts.append(opt)
    return opts, fp_opt


def recommend(model: "int | ModelSize | str | os.PathLike", device: str, memory_bytes: int | str,
              max_ppl_increase: float | str | None = None, results: Any = None, *,
              capability: tuple[int, int] | str | None = None, allow_reference: bool = False,
              include_float: bool = True) -> Recommendation:
    """Pick the method and setting whose weights fit ``memory_bytes`` on ``device`` with the least
    perplexity increase, and say why.

    Args:
        model: a parameter count, a :class:`ModelSize`, or a model spec (see :func:`model_size`).
        device: ``cpu``, ``cuda``, ``rocm``, ``mps`` or ``xpu``.
        memory_bytes: the budget for the weights (an int, or a size string like ``4GB``).
        max_ppl_increase: the largest acceptable perplexity increase, a fraction (``0.05``) or a
            string (``5%``); None: no limit.
        results: sweep records (``results.json`` payload, its list of runs, or a path to it /
            its folder). Measured options are preferred; without it, the prior table decides.
        capability: the CUDA compute capability (``(8, 9)`` or ``"8.9"``) to hold the kernels'
            minimum against (default: the GPU's here, when ``device`` is cuda and one exists).
        allow_reference: accept options that only the reference kernel (or another slow path)
            runs on the device.
        include_float: consider the unquantized model (no loss) too.

    Returns a :class:`Recommendation`; ``ok`` is False (a refusal with the reason) when no option
    qualifies. Raises ValueError naming the argument for invalid input.
    """
    from polyquant.report.matrix import device_class
    dc = device_class(device) if isinstance(device, str) else None
    if dc is None:
        raise ValueError(f"device must be a string like 'cpu' or 'cuda', got {device!r}")
    budget = parse_size(memory_bytes, "memory_bytes")
    limit = None if max_ppl_increase is None else parse_ppl_increase(max_ppl_increase)
    if isinstance(capability, str):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", capability)
        if not m:
            raise ValueError(f"capability must look like 8.9, got {capability!r}")
        capability = (int(m.group(1)), int(m.group(2)))
    if capability is not None:
        if (not isinstance(capability, (tuple, list)) or len(capability) != 2
                or not all(isinstance(c, int) and c >= 0 for c in capability)):
            raise ValueError(f"capability must be (major, minor), got {capability!r}")
        if dc.key != "cuda":
            raise ValueError(f"capability applies to cuda only, not device {dc.key!r}")
        capability = tuple(capability)
    elif dc.key == "cuda":
        import torch
        if torch.cuda.is_available() and getattr(torch.version, "hip", None) is None:
            capability = tuple(torch.cuda.get_device_capability())
    size = model_size(model)
    records = _records(results)

    measured, fp_opt = _measured_options(records, size, dc, capability) if records else ([], None)
    priors = _prior_options(size, dc, capability)
    seen = {(o.method, o.setting) for o in measured}
    candidates = measured + [o for o in priors if (o.method, o.setting) not in seen]
    if include_float:
        candidates.append(fp_opt or Option(
            "fp32", "unquantized", None, "exact", size.total_params * size.float_bytes,
            f"{size.total_params:,} params x {size.float_bytes} bytes", 8.0 * size.float_bytes, 0.0,
            "no quantization", "dense", True, "plain torch Linear layers"))

    for o in candidates:
        if o.rejected:
            continue
        why = []
        if o.weight_bytes > budget:
            why.append(f"does not fit: {format_bytes(o.weight_bytes)} > {format_bytes(budget)}")
        if not o.fast and not allow_reference:
            why.append(f"no fast kernel on {dc.key} ({o.kernel_note}); allow_reference accepts it")
        if limit is not None:
            if o.ppl_increase is None:
                why.append("ppl increase unknown, the limit cannot be checked")
            elif o.ppl_increase > limit:
                why.append(f"ppl {_pct(o.ppl_increase)} over the {_pct(limit)} limit")
        o.rejected = "; ".join(why) or None

    tier = {"exact": 0, "measured": 0, "prior": 1}
    # best evidence first, then least loss; at equal loss a prior backed by a measurement beats an
    # assumed one, then fewer bytes
    rank = lambda o: (tier[o.evidence], math.inf if o.ppl_increase is None else o.ppl_increase,  # noqa: E731
                      o.ppl_note.startswith("assumed"), o.weight_bytes, o.method, o.setting)
    accepted = sorted((o for o in candidates if not o.rejected), key=rank)
    rejected = sorted((o for o in candidates if o.rejected), key=lambda o: (o.weight_bytes, o.method, o.setting))
    evidence = (f"measured results ({sum(1 for r in records if r.get('config') is not None)} quantized runs), "
                f"then registry traits with the prior table for settings not measured" if records
                else "registry traits (bits per weight of each method's layout) and the prior table")
    rec = Recommendation(False, None, "", size.name, size.total_params, size.quantized_params, dc.key,
                         f"{capability[0]}.{capability[1]}" if capability else None, budget, limit, evidence,
                         accepted, rejected)
    if accepted:
        best = accepted[0]
        rec.ok, rec.choice = True, best
        parts = [f"least ppl increase ({_pct(best.ppl_increase)}, {best.evidence}) among the "
                 f"{len(accepted)} options that fit {format_bytes(budget)} and run on {dc.key}"]
        if best.evidence != "prior":
            better_prior = [o for o in accepted if o.evidence == "prior" and o.ppl_increase is not None
                            and best.ppl_increase is not None and o.ppl_increase < best.ppl_increase]
            if better_prior:
                o = better_prior[0]
                parts.append(f"measured options are preferred to estimates: {o.method} [{o.setting}] has a "
                             f"lower prior ({_pct(o.ppl_increase)}) but was not measured")
        elif records:
            parts.append("no measured option qualifies, so this rests on the prior table")
        if best.method == "fp32":
            parts.append("the unquantized model fits: no quantization needed")
        rec.reason = "; ".join(parts)
        return rec
    rec.reason = _refusal(candidates, budget, dc.key, limit, allow_reference)
    return rec


def _refusal(cands: Sequence[Option], budget: int, dev: str, limit: float | None, allow_reference: bool) -> str:
    fits = [o for o in cands if o.weight_bytes <= budget and o.weight_bytes > 0]
    if not fits:
        small = min((o for o in cands if o.weight_bytes > 0), key=lambda o: o.weight_bytes, default=None)
        if small is None:
            return "no option could be sized"
        return (f"nothing fits {format_bytes(budget)}: the smallest option, {small.method} [{small.setting}], "
                f"needs {format_bytes(small.weight_bytes)} for the weights")
    why = [f"{len(fits)} option(s) fit {format_bytes(budget)} but none qualifies"]
    slow = [o for o in fits if o.rejected and "no fast kernel" in o.rejected]
    if slow and not allow_reference:
        why.append(f"{len(slow)} run only on the reference kernel or slow paths on {dev} (allow_reference / "
                   f"--allow-reference accepts them)")
    over = [o for o in fits if o.rejected and "limit" in o.rejected]
    if over and limit is not None:
        best = min((o.ppl_increase for o in over if o.ppl_increase is not None), default=None)
        why.append(f"{len(over)} exceed the {_pct(limit)} ppl limit (the best that fits: {_pct(best)})")
    other = [o for o in fits if o not in slow and o not in over]
    if other:
        why.append(f"{len(other)} rejected otherwise (e.g. {other[0].method}: {other[0].rejected})")
    return "; ".join(why)
