"""The hardware compatibility matrix, generated from the registries.

This module owns:

* ``DEVICE_CLASSES``: the device classes of the matrix (CPU, CUDA, ROCm, Apple MPS, Intel XPU),
  what each needs, and the storage dtypes PyTorch has no support for there;
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
* the *probed* matrix (:func:`probed_matrix`): what actually ran in a sweep (records of
  ``polyquant compare``'s ``results.json``), with the kernels used or the error;
* their renderings: Markdown, JSON and an HTML fragment (tables with classes, inline style only).
"""
from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from polyquant.activations import ACT_RULES

__all__ = ["DeviceClass", "DEVICE_CLASSES", "device_class", "representative_configs", "sample_layer",
           "device_cell", "declared_row", "declared_matrix", "record_kernels", "probed_matrix", "matrix_markdown",
           "matrix_json", "matrix_html", "SAMPLE_SHAPE"]

#: The sample weight every setting is quantized on: [out, in] (multiples of 16 and of the common
#: group sizes, so the layout checks kernels make on real models apply to it too).
SAMPLE_SHAPE = (256, 512)
_CALIB_ROWS = 256

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))


@dataclass(frozen=True)
class DeviceClass:
    """One column group of the matrix.

    Attributes:
        key: ``cpu``, ``cuda``, ``rocm``, ``mps``, ``xpu`` (JSON keys, ``--device`` values).
        label: column title.
        torch_type: the device type kernels are asked about (``Kernel.devices`` entries; ROCm
            kernels declare ``hip``).
        needs: what the machine and PyTorch build need.
        unsupported_dtypes: storage dtypes PyTorch cannot hold on this device class.
        dtype_note: why (shown as the reason).
    """

    key: str
    label: str
    torch_type: str
    needs: str
    unsupported_dtypes: tuple[torch.dtype, ...] = ()
    dtype_note: str = ""


DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("cpu", "CPU", "cpu", "any PyTorch build (x86-64 or arm64)"),
    DeviceClass("cuda", "CUDA", "cuda", "an NVIDIA GPU, its driver, and a CUDA build of PyTorch; the Triton "
                "kernels also need the triton package"),
    DeviceClass("rocm", "ROCm", "hip", "an AMD GPU with a ROCm build of PyTorch (it names the device 'cuda'; "
                "kernels declared for 'hip' only)"),
    DeviceClass("mps", "Apple MPS", "mps", "Apple silicon, macOS 13+, a PyTorch build with MPS",
                _FLOAT8 + (torch.float64,), "MPS has no float8 (or float64) tensors"),
    DeviceClass("xpu", "Intel XPU", "xpu", "an Intel GPU with PyTorch's XPU build and Intel's GPU driver"),
)

_BY_KEY = {d.key: d for d in DEVICE_CLASSES}
_ALIASES = {"gpu": "cuda", "hip": "rocm", "apple": "mps", "metal": "mps", "intel": "xpu"}


def device_class(name: str) -> DeviceClass:
    """The device class of ``name`` (``cpu``, ``cuda``, ``cuda:0``, ``rocm``, ``hip``, ``mps``, ``xpu``)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"device must be one of {sorted(_BY_KEY)}, got {name!r}")
    key = name.strip().lower().split(":", 1)[0]
    key = _ALIASES.get(key, key)
    if key not in _BY_KEY:
        raise ValueError(f"device must be one of {sorted(_BY_KEY)}, got {name!r}")
    return _BY_KEY[key]


def _present(dc: DeviceClass) -> bool:
    """Whether this machine has such a device (then ``supports`` checks the real one)."""
    if dc.key == "cpu":
        return True
    if dc.key == "cuda":
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is None
    if dc.key == "rocm":
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is not None
    if dc.key == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if dc.key == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


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
                           "error": error, "devices": {}}
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
    return row


def declared_matrix(methods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The declared matrix: one JSON-able row per (registered method, bit width), sorted by
    method name then bits. Row keys: ``method family bits setting config needs_calibration
    activations formats qtype block bits_per_weight activation_rule error devices``;
    ``devices`` maps each ``DEVICE_CLASSES`` key to a :func:`device_cell` dict. ``methods``
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


# -- renderings -------------------------------------------------------------------------------

_YES, _NO = "✓", "✗"


def _is_declared(rows: Sequence[dict[str, Any]]) -> bool:
    return bool(rows) and "devices" in rows[0]


def _fast_text(cell: dict[str, Any]) -> str:
    names = []
    for k in cell["fast"]:
        cap = cell["min_capability"].get(k)
        names.append(f"{k} (cc ≥ {cap})" if cap else k)
    if names:
        return ", ".join(names)
    if cell["slow"]:
        return "— (slow: " + ", ".join(cell["slow"]) + ")"
    return "—"


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "?"
    return (f"{_YES if cell['quantize'] else _NO} / {_YES if cell['reference'] else _NO} / {_fast_text(cell)}")


def _md(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _declared_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ["method", "bits", "setting"] + [d.label for d in DEVICE_CLASSES]
    lines = ["Each cell: quantize / run with the reference kernel / fast kernels (— none; cc: minimum "
             "CUDA compute capability).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("error") and not r.get("devices"):
            cells = [f"error: {r['error']}"] + [""] * (len(DEVICE_CLASSES) - 1)
        else:
            cells = [_cell_text(r["devices"].get(d.key)) for d in DEVICE_CLASSES]
        lines.append("| " + " | ".join(_md(c) for c in [f"`{r['method']}`", r["bits"], r["setting"], *cells]) + " |")
    lines += ["", "Needs: " + "; ".join(f"{d.label}: {d.needs}" for d in DEVICE_CLASSES) + "."]
    return "\n".join(lines)


def _kernels_text(kernels: dict[str, int]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))) or "—"


def _probed_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ["run", "method", "setting", "device", "status", "kernels (layers)", "declared", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error') or ''}"
        lines.append("| " + " | ".join(_md(c) for c in [
            r.get("name") or "", f"`{r['method']}`", r["setting"], r["device"], status,
            _kernels_text(r["kernels"]), r.get("declared_kernel") or "—", r.get("note") or ""]) + " |")
    return "\n".join(lines)


def matrix_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of declared rows (:func:`declared_matrix`) or probed rows
    (:func:`probed_matrix`), told apart by their keys."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    return _declared_markdown(rows) if _is_declared(rows) else _probed_markdown(rows)


def matrix_json(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as indented JSON (non-finite floats become null)."""
    from polyquant.report.store import to_jsonable
    return json.dumps(to_jsonable(list(rows)), indent=2, allow_nan=False, ensure_ascii=False)


_CSS = """
.pq-matrix{font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1em 0}
.pq-matrix table{border-collapse:collapse;margin:.5em 0}
.pq-matrix th,.pq-matrix td{border:1px solid #ccd;padding:3px 6px;vertical-align:top;text-align:left}
.pq-matrix th{background:#eef0f6}
.pq-matrix td.pq-fast{background:#e3f4e1}
.pq-matrix td.pq-ref{background:#fdf6dc}
.pq-matrix td.pq-no{background:#f9e0e0}
.pq-matrix td.pq-failed{background:#f9e0e0}
.pq-matrix td.pq-ok{background:#e3f4e1}
.pq-matrix .pq-k{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.pq-matrix .pq-legend{color:#555;font-size:12px}
""".strip()


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _cell_html(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return '<td class="pq-no">?</td>'
    cls = "pq-fast" if cell["fast"] else "pq-ref" if cell["reference"] else "pq-no"
    declined = "; ".join(f"{k}: {v}" for k, v in cell["declined"].items())
    title = f"quantize: {cell['quantize_note'] or ('yes' if cell['quantize'] else 'no')}" + \
            (f" | reference: {cell['reference_reason']}" if cell["reference_reason"] else "") + \
            (f" | declined: {declined}" if declined else "")
    parts = [f'<span class="pq-q">Q {_YES if cell["quantize"] else _NO}</span>',
             f'<span class="pq-r">R {_YES if cell["reference"] else _NO}</span>',
             f'<span class="pq-k">{_e(_fast_text(cell))}</span>']
    return f'<td class="{cls}" title="{_e(title)}">' + "<br>".join(parts) + "</td>"


def _declared_html(rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in ["method", "family", "bits", "setting"]) + "".join(
        f'<th title="{_e(d.needs)}">{_e(d.label)}</th>' for d in DEVICE_CLASSES)
    body = []
    for r in rows:
        lead = (f'<td class="pq-k">{_e(r["method"])}</td><td>{_e(r["family"])}</td><td>{_e(r["bits"])}</td>'
                f'<td>{_e(r["setting"])}</td>')
        if r.get("error") and not r.get("devices"):
            cells = f'<td class="pq-no" colspan="{len(DEVICE_CLASSES)}">{_e(r["error"])}</td>'
        else:
            cells = "".join(_cell_html(r["devices"].get(d.key)) for d in DEVICE_CLASSES)
        body.append(f'<tr data-method="{_e(r["method"])}">{lead}{cells}</tr>')
    needs = "".join(f"<li><b>{_e(d.label)}</b>: {_e(d.needs)}</li>" for d in DEVICE_CLASSES)
    return (f'<table class="pq-matrix-declared"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f'<p class="pq-legend">Q: polyquant can quantize there; R: the reference kernel runs it; then the fast '
            f'kernels (cc: minimum CUDA compute capability; — none). Hover a cell for the reasons kernels '
            f'declined.</p><ul class="pq-legend">{needs}</ul>')


def _probed_html(rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in
                   ["run", "method", "setting", "device", "status", "kernels (layers)", "declared", "note"])
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        status = "ok" if ok else f"{r['status']}: {r.get('error') or ''}"
        body.append(
            f'<tr data-method="{_e(r["method"])}"><td>{_e(r.get("name"))}</td><td class="pq-k">{_e(r["method"])}</td>'
            f'<td>{_e(r["setting"])}</td><td>{_e(r["device"])}</td>'
            f'<td class="{"pq-ok" if ok else "pq-failed"}">{_e(status)}</td>'
            f'<td class="pq-k {"pq-fast" if r.get("fast") else "pq-ref" if ok else ""}">'
            f'{_e(_kernels_text(r["kernels"]))}</td>'
            f'<td class="pq-k">{_e(r.get("declared_kernel") or "—")}</td><td>{_e(r.get("note"))}</td></tr>')
    if not body:
        body.append(f'<tr><td colspan="8">no quantized runs in these results</td></tr>')
    return f'<table class="pq-matrix-probed"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def matrix_html(declared: Sequence[dict[str, Any]], probed: Sequence[dict[str, Any]] | None = None) -> str:
    """An HTML fragment (a ``<section class="pq-matrix">`` with an inline ``<style>``; no external
    CSS or JS): the declared table and, when given, the probed one."""
    declared = list(declared)
    if declared and not _is_declared(declared):
        raise ValueError("declared must be rows of declared_matrix()")
    parts = [f"<section class=\"pq-matrix\"><style>{_CSS}</style>",
             "<h3>Declared: what each method and setting can do on each device</h3>", _declared_html(declared)]
    if probed is not None:
        probed = list(probed)
        if probed and _is_declared(probed):
            raise ValueError("probed must be rows of probed_matrix()")
        parts += ["<h3>Probed: what ran in this sweep</h3>", _probed_html(probed)]
    parts.append("</section>")
    return "".join(parts)
