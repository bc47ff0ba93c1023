"""The hardware compatibility matrix, generated from the registries.

This module owns:

* (``DEVICE_CLASSES``, the device classes of the matrix, are :mod:`polyquant.report.devices`)
* the *representative settings*: one config per (registered method, bit width it supports)
  (:func:`representative_configs`);
* the *declared* matrix (:func:`declared_matrix`): for each setting and device class, whether
  polyquant can quantize there, run it with the ``reference`` kernel, and run it with a fast
  kernel (which ones, with the minimum CUDA compute capability). It is computed, not written:
  each setting quantizes a small random weight with the method's own function (calibration
  statistics from the method's own collector on random inputs) and every registered kernel is
  asked ``supports(qw, device)`` (a kernel that raises is recorded with the error, never fatal).
  For a device this machine does not have, the kernels' declared ``devices`` and
  ``min_capability`` decide, plus the layout checks ``supports`` makes without the device;
* the *export* cells of each declared row (:func:`export_cell`): for every registered export
  target (``polyquant.export.EXPORTERS``: ONNX for onnxruntime, GGUF for llama.cpp), whether it
  stores the sample layer's codes and scales as they are, in which of its types, or why not
  (the target's own ``check_layer``), and which runtimes read the file (verified, and the
  others with why they are not);
* the *probed* matrix (:func:`probed_matrix`): what actually ran in a sweep (records of
  ``polyquant compare``'s ``results.json``), with the kernels used or the error;
* their renderings (Markdown, JSON and an HTML fragment) are :mod:`polyquant.report.matrix_render`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from polyquant.activations import ACT_RULES
from polyquant.report.devices import DEVICE_CLASSES, DeviceClass, _present, device_class  # noqa: F401
from polyquant.report.matrix_render import matrix_html, matrix_json, matrix_markdown  # noqa: F401

__all__ = ["DeviceClass", "DEVICE_CLASSES", "device_class", "representative_configs", "sample_layer",
           "device_cell", "export_cell", "export_targets", "declared_row", "declared_matrix", "record_kernels", "probed_matrix", "matrix_markdown",
           "matrix_json", "matrix_html", "SAMPLE_SHAPE"]

#: The sample weight every setting is quantized on: [out, in] (multiples of 16 and of the common
#: group sizes, so the layout checks kernels make on real models apply to it too).
SAMPLE_SHAPE = (256, 512)
_CALIB_ROWS = 256

# -- representative settings ------------------------------------------------------------------

def representative_configs(spec) -> list[tuple[int, Any, str | None]]:
    """One config per bit width of a method: ``(bits, config or None, error or None)``.

    The config is the method's defaults with ``bits`` set (where the config has that field) and,
    where it has ``group_size``, per-channel scales at 8 bits and groups of 64 below (falling back
    to the default group when the method refuses those). A method without a ``bits`` field has
    one row, at its default config."""
    fields = {f.name for f in dataclasses.fields(spec.config_cls) if f.init}
    out: list[tuple[int, Any, str | None]] = []
    widths = list(spec.bits) if "bits" in fields else [None]
    for b in widths:
        tries: list[dict[str, Any]] = []
        base = {} if b is None else {"bits": b}
        if "group_size" in fields:
            width = b if b is not None else min(spec.bits, default=8)
            tries.append({**base, "group_size": -1 if width >= 8 else 64})
        tries.append(base)
        cfg, err = None, None
        for kw in tries:
            try:
                cfg = spec.config_cls(**kw)
                break
            except (ValueError, TypeError) as e:
                err = f"{type(e).__name__}: {e}"
        bits = b if b is not None else int(getattr(cfg, "bits", None) or (spec.bits[0] if spec.bits else 0))
        out.append((bits, cfg, None if cfg is not None else err))
    return out


_SAMPLES: dict[tuple, tuple[Any, Any, str | None]] = {}


def _config_key(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def sample_layer(config, shape: tuple[int, int] = SAMPLE_SHAPE):
    """Quantize a seeded random ``shape`` weight with ``config``'s method, as ``quantize_model``
    would build the layer: returns ``(QuantizedWeight, act_quant)`` (the layer's bound weight and
    activation rule). Methods that need data get statistics from their own collector fed seeded
    random inputs. Raises what the method raises. Cached per (method, config, shape)."""
    from polyquant.calibration.stats import collector_factory
    from polyquant.methods import get_method
    from polyquant.nn.quantize import make_quant_linear
    spec = get_method(config.method)
    key = (spec.name, id(spec), _config_key(config), tuple(shape))
    hit = _SAMPLES.get(key)
    if hit is not None:
        qw, act, err = hit
        if err is not None:
            raise ValueError(err)
        return qw, act
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    try:
        stats = None
        if spec.needs_calibration:
            col = collector_factory(spec)(lin)
            x = torch.randn(_CALIB_ROWS, in_f, generator=g)
            col.add(x)
            stats = col.result()
        qw = spec.quantize_weight(lin.weight.data.clone(), config, stats)
        ql = make_quant_linear(spec, config, qw, lin)
        res = (ql.quantized_weight, ql.act_quant, None)
    except Exception as e:  # recorded in the row, the matrix goes on
        _SAMPLES[key] = (None, None, f"{type(e).__name__}: {e}")
        raise
    _SAMPLES[key] = res
    return res[0], res[1]


# -- one cell ---------------------------------------------------------------------------------

def _cap_str(cap: tuple[int, int] | None) -> str | None:
    return None if cap is None else f"{cap[0]}.{cap[1]}"


def device_cell(qw, act_quant, dc: DeviceClass | str, capability: tuple[int, int] | None = None,
                checked_quantize: bool = False) -> dict[str, Any]:
    """What can be done with one quantized layout on one device class.

    Returns ``quantize`` (bool) and ``quantize_note``; ``reference`` (bool) and
    ``reference_reason``; ``fast`` (names of fast kernels that take it, highest priority first),
    ``min_capability`` (kernel -> ``"8.9"`` for CUDA kernels that declare one); ``slow`` (other
    non-reference kernels that take it, e.g. emulations); ``declined`` (kernel -> reason, for
    kernels declared for this device that do not take it); ``kernel`` (what ``auto`` would pick);
    ``checked_here`` (the device exists on this machine, so ``supports`` checked the real one).
    ``capability``: a CUDA compute capability to hold the kernels' ``min_capability`` against."""
    from polyquant.kernels import list_kernels
    if isinstance(dc, str):
        dc = device_class(dc)
    here = _present(dc)
    cell: dict[str, Any] = {"quantize": True, "quantize_note": "", "reference": False, "reference_reason": None,
                            "fast": [], "min_capability": {}, "slow": [], "declined": {}, "kernel": None,
                            "checked_here": here}
    bad = sorted({str(t.dtype).replace("torch.", "") for t in qw.tensors().values()
                  if t.dtype in dc.unsupported_dtypes})
    if bad:
        why = f"{dc.dtype_note} (this layout stores {', '.join(bad)})"
        cell.update(quantize=False, quantize_note=why, reference_reason=why)
        return cell
    if dc.key == "cpu":
        cell["quantize_note"] = "pure PyTorch; checked on this machine" if checked_quantize else "pure PyTorch"
    else:
        cell["quantize_note"] = ("pure PyTorch ops" + ("" if here else "; declared, not run on this machine"))
    device = torch.device(dc.torch_type)
    for k in list_kernels():
        if dc.torch_type not in k.devices:
            continue
        if not k.runs_act(act_quant):
            rules = [ACT_RULES[p["kind"]].__name__ if p.get("kind") in ACT_RULES else str(p) for p in k.act_rules]
            cell["declined"][k.name] = (f"computes another activation rule ({', '.join(rules)}); "
                                        f"this setting's is {type(act_quant).__name__ if act_quant else 'none'}")
            continue
        try:
            reason = k.layout_reason(qw) or k.supports(qw, device)
        except Exception as e:  # a kernel's supports() must not break the matrix
            reason = f"supports() raised {type(e).__name__}: {e}"
        if reason is None and capability is not None and k.min_capability is not None \
                and tuple(capability) < tuple(k.min_capability):
            reason = f"needs compute capability >= {_cap_str(k.min_capability)}, got {_cap_str(tuple(capability))}"
        if reason is not None:
            if k.name == "reference":
                cell["reference_reason"] = reason
            cell["declined"][k.name] = reason
            continue
        if cell["kernel"] is None:
            cell["kernel"] = k.name
        if k.name == "reference":
            cell["reference"] = True
        elif k.fast:
            cell["fast"].append(k.name)
            if k.min_capability is not None:
                cell["min_capability"][k.name] = _cap_str(k.min_capability)
        else:
            cell["slow"].append(k.name)
    return cell


def export_targets() -> list:
    """The registered export targets (``polyquant.export.list_exporters()``), sorted by name; a target
    whose dependency is missing is left out."""
    from polyquant.export import list_exporters
    return [x for _, x in sorted(list_exporters().items())]


def export_cell(qw, exporter) -> dict[str, Any]:
    """Whether one export target holds a quantized layout as it is: ``exact`` (bool), ``type`` (the
    target's storage type, e.g. ``Q4_0`` / ``MatMulNBits4``, when exact), ``reason`` (why not, from
    the target's ``check_layer``; None when exact), ``readers`` (runtimes verified to run its files)
    and ``untested_readers`` (runtime -> why it is not verified)."""
    cell: dict[str, Any] = {"exact": False, "type": None, "reason": None, "readers": list(exporter.readers),
                            "untested_readers": dict(exporter.untested_readers)}
    if exporter.check_layer is None:
        cell["reason"] = f"the {exporter.name} target declares no layer check"
        return cell
    try:
        reason = exporter.check_layer(qw)
    except Exception as e:  # a target's check must not break the matrix
        reason = f"check_layer() raised {type(e).__name__}: {e}"
    if reason is None:
        cell["exact"] = True
        if exporter.layer_type is not None:
            try:
                cell["type"] = exporter.layer_type(qw)
            except Exception as e:
                cell["type"] = f"? ({type(e).__name__}: {e})"
    else:
        cell["reason"] = reason
    return cell


def _spec_traits(spec) -> dict[str, Any]:
    return {"method": spec.name, "family": spec.family, "needs_calibration": spec.needs_calibration,
            "activations": spec.activations, "formats": list(spec.formats)}


def declared_row(spec, bits: int, config, error: str | None = None,
                 devices: Sequence[DeviceClass] = DEVICE_CLASSES) -> dict[str, Any]:
    """One row of the declared matrix (see :func:`declared_matrix`)."""
    row: dict[str, Any] = {**_spec_traits(spec), "bits": bits,
                           "setting": config.describe() if config is not None else f"{spec.name} w{bits}",
                           "config": config.to_dict() if config is not None else None,
                           "qtype": None, "block": None, "bits_per_weight": None, "activation_rule": None,
                           "error": error, "devices": {}, "exports": {}}
    if config is None:
        return row
    try:
        qw, act = sample_layer(config)
    except Exception as e:
        row["error"] = f"quantizing a {SAMPLE_SHAPE[0]}x{SAMPLE_SHAPE[1]} sample failed: {type(e).__name__}: {e}"
        return row
    row["qtype"] = qw.qtype
    row["block"] = list(qw.block)
    row["bits_per_weight"] = round(qw.nbytes() * 8 / (qw.shape[0] * qw.shape[1]), 4)
    row["activation_rule"] = type(act).__name__ if act is not None else None
    for dc in devices:
        row["devices"][dc.key] = device_cell(qw, act, dc, checked_quantize=True)
    row["exports"] = {x.name: export_cell(qw, x) for x in export_targets()}
    return row


def declared_matrix(methods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The declared matrix: one JSON-able row per (registered method, bit width), sorted by
    method name then bits. Row keys: ``method family bits setting config needs_calibration
    activations formats qtype block bits_per_weight activation_rule error devices exports``;
    ``devices`` maps each ``DEVICE_CLASSES`` key to a :func:`device_cell` dict, ``exports`` each
    export target's name to an :func:`export_cell` dict (absent when the sample failed). ``methods``
    restricts the rows to those names (ValueError naming an unknown one)."""
    from polyquant.methods import METHODS, get_method
    names = sorted(METHODS) if methods is None else [get_method(m).name for m in methods]
    rows = []
    for name in names:
        spec = METHODS[name]
        for bits, cfg, err in representative_configs(spec):
            rows.append(declared_row(spec, bits, cfg, err))
    return rows


# -- the probed matrix ------------------------------------------------------------------------

def _records(records: Any) -> list[dict[str, Any]]:
    if isinstance(records, dict):
        if "runs" not in records:
            raise ValueError("records must be a list of run records or a results.json payload with 'runs'")
        records = records["runs"]
    if not isinstance(records, (list, tuple)):
        raise ValueError(f"records must be a list of run records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"records[{i}] must be a dict, got {type(r).__name__}")
    return list(records)


def record_kernels(rec: dict[str, Any]) -> dict[str, int]:
    """Kernel name -> layer count of a sweep record (``kernel`` / ``kernels`` as a dict, list or
    string, or the metrics' ``kernels``)."""
    metrics = rec.get("metrics") or {}
    for v in (rec.get("kernels"), rec.get("kernel"), metrics.get("kernels"), metrics.get("kernel")):
        if isinstance(v, dict) and v:
            return {str(k): int(n) if isinstance(n, (int, float)) else 1 for k, n in v.items()}
        if isinstance(v, (list, tuple)) and v:
            return {str(k): 1 for k in v}
        if isinstance(v, str) and v:
            out = {}
            for part in v.split(","):
                name, _, n = part.strip().partition(":")
                out[name] = int(n) if n.isdigit() else 1
            return out
    return {}


def _declared_for(config_dict: dict[str, Any], dc: DeviceClass) -> tuple[dict[str, Any] | None, str | None]:
    from polyquant.methods import config_from_dict
    try:
        cfg = config_from_dict(dict(config_dict))
        qw, act = sample_layer(cfg)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return device_cell(qw, act, dc), None


def probed_matrix(records: Any) -> list[dict[str, Any]]:
    """What actually ran in a sweep: one row per quantized run record (the unquantized baseline
    is left out). ``records``: the list of run records, or the ``results.json`` payload.

    Row keys: ``name method bits setting device status kernels`` (kernel -> layers) ``fast``
    (some layer ran on a fast kernel) ``reference_layers`` ``error`` ``declared_kernel`` (what
    ``auto`` picks for this config on the sample layout on that device class) ``declared_fast``
    ``as_declared`` (the declared kernel is among those used; None when unknown) ``note``."""
    from polyquant.kernels import KERNELS
    rows = []
    for rec in _records(records):
        cfg = rec.get("config")
        if cfg is None:
            continue  # the unquantized baseline
        if not isinstance(cfg, dict):
            raise ValueError(f"record {rec.get('name')!r}: config must be a dict, got {type(cfg).__name__}")
        metrics = rec.get("metrics") or {}
        dev = str(rec.get("device") or "cpu")
        try:
            dc = device_class(dev)
        except ValueError:
            dc = None
        kernels = record_kernels(rec) if rec.get("status") == "ok" else {}
        fast = any(KERNELS[k].fast for k in kernels if k in KERNELS) if kernels else None
        row: dict[str, Any] = {
            "name": rec.get("name"), "method": rec.get("method") or cfg.get("method"),
            "bits": cfg.get("bits", metrics.get("bits")), "setting": rec.get("setting") or "",
            "device": dev, "status": rec.get("status") or "unknown", "kernels": kernels, "fast": fast,
            "reference_layers": kernels.get("reference", 0), "error": rec.get("error"),
            "declared_kernel": None, "declared_fast": None, "as_declared": None, "note": ""}
        if dc is None:
            row["note"] = f"unknown device class {dev!r}"
        else:
            cell, err = _declared_for(cfg, dc)
            if cell is None:
                row["note"] = f"no declared entry: {err}"
            else:
                row["declared_kernel"] = cell["kernel"]
                row["declared_fast"] = cell["fast"]
                if kernels and cell["kernel"] is not None:
                    row["as_declared"] = cell["kernel"] in kernels
                    if not row["as_declared"]:
                        row["note"] = (f"ran on {', '.join(sorted(kernels))}, declared {cell['kernel']} for the "
                                       f"{SAMPLE_SHAPE[0]}x{SAMPLE_SHAPE[1]} sample (this model's layer shapes differ)")
        rows.append(row)
    return rows
