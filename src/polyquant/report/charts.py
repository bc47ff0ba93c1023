"""Charts of a ``compare`` sweep (matplotlib, Agg canvas, no pyplot state), each written as PNG
and SVG (text kept as ``<text>`` so the page can be searched and the labels tested):

* ``ppl_vs_bits``: perplexity against effective bits per weight of the quantized layers
  (``quantized_bytes * 8 / quantized_params``: codes, scales, zeros, index and extras counted),
  log scale, with the Pareto front (lowest perplexity for its size) and the fp32 reference line;
* ``kl_vs_bits``: the same with KL divergence to fp32 (when the runs have it);
* ``speed_vs_memory``: decode tokens/s against the stored weight bytes of the whole model, with
  the fp32 point and reference line (hollow markers: runs on kernels that are not fast paths,
  whose decode is timed over fewer tokens);
* ``quantize_time``: wall-clock quantization seconds per run.

Every point is one finished run; the legend names each by method and setting. A chart with no
data is not written (:func:`write_charts` says why in its result).
"""
from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from polyquant.report.store import atomic_write_bytes, atomic_write_text

__all__ = ["CHARTS", "Point", "chart_points", "pareto_front", "write_charts", "render_chart"]

log = logging.getLogger(__name__)

#: Chart name -> title.
CHARTS: dict[str, str] = {
    "ppl_vs_bits": "Perplexity vs. effective bits per weight",
    "kl_vs_bits": "KL divergence to fp32 vs. effective bits per weight",
    "speed_vs_memory": "Decode speed vs. weight memory",
    "quantize_time": "Quantization time per run",
}

_MARKERS = "osD^v<>pPXh*"
_BPW_LABEL = "effective bits per weight (quantized layers; scales and zeros counted)"


@dataclass
class Point:
    """One finished run, as the charts see it."""

    name: str
    method: str
    setting: str
    label: str
    baseline: bool
    bits_per_weight: float | None
    ppl: float | None
    kl: float | None
    weight_mb: float | None
    decode_tok_s: float | None
    quantize_s: float | None
    slow_kernel: bool


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _label(rec: dict[str, Any]) -> str:
    method, setting = str(rec.get("method", "?")), str(rec.get("setting", ""))
    if rec.get("config") is None:
        return "fp32 (unquantized)"
    return setting if setting.split(" ")[0] == method else f"{method}: {setting}"


def chart_points(result: dict[str, Any]) -> list[Point]:
    """The finished runs of a ``run_compare`` result as :class:`Point` (failed runs left out)."""
    from polyquant.kernels import KERNELS
    pts = []
    for r in result.get("runs", []):
        if r.get("status") != "ok":
            continue
        m = r.get("metrics") or {}
        kernels = r.get("kernel") or {}
        slow = any(k in KERNELS and not KERNELS[k].fast for k in kernels)
        wb = _num(m.get("weight_bytes"))
        pts.append(Point(
            name=str(r.get("name", "?")), method=str(r.get("method", "?")), setting=str(r.get("setting", "")),
            label=_label(r), baseline=r.get("config") is None,
            bits_per_weight=_num((r.get("size") or {}).get("bits_per_weight")),
            ppl=_num(m.get("ppl")), kl=_num(m.get("kl")), weight_mb=wb / 1e6 if wb is not None else None,
            decode_tok_s=_num(m.get("decode_tok_s")),
            quantize_s=_num((r.get("timings") or {}).get("quantize_s")) if r.get("config") is not None else None,
            slow_kernel=slow))
    return pts


def pareto_front(xy: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x and lower y are better),
    in order of increasing x."""
    order = sorted(range(len(xy)), key=lambda i: (xy[i][0], xy[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if xy[i][1] < best:
            front.append(i)
            best = xy[i][1]
    return front


def _styles(points: Sequence[Point]) -> dict[str, tuple[Any, str]]:
    """A (colour, marker) per run: one colour per method, markers varying within a method."""
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    palette = [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]  # strong colours first
    methods = list(dict.fromkeys(p.method for p in points if not p.baseline))
    out: dict[str, tuple[Any, str]] = {}
    seen: dict[str, int] = {}
    for p in points:
        i = seen.get(p.method, 0)
        seen[p.method] = i + 1
        colour = "black" if p.baseline else palette[methods.index(p.method) % len(palette)]
        out[p.name] = (colour, _MARKERS[i % len(_MARKERS)])
    return out


def _figure(width: float = 11.0, height: float = 6.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, ax, title: str, subtitle: str, legend: bool = True) -> None:
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=12)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    fig.tight_layout()


def _log_axis(ax, axis: str, values: Sequence[float]) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter
    vals = [v for v in values if v and v > 0]
    if len(vals) < 2 or max(vals) / min(vals) < 3:
        return
    getattr(ax, f"set_{axis}scale")("log")
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_formatter(fmt)
    if max(vals) / min(vals) < 30:  # a short log axis: label the minor ticks too
        a.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        mfmt = ScalarFormatter()
        mfmt.set_scientific(False)
        a.set_minor_formatter(mfmt)


def _quality_chart(points: Sequence[Point], metric: str, subtitle: str):
    """``metric`` (ppl or kl) against bits per weight, with the Pareto front and fp32 reference."""
    styles = _styles(points)
    q = [p for p in points if not p.baseline and p.bits_per_weight is not None and getattr(p, metric) is not None]
    if metric == "kl":
        q = [p for p in q if p.kl > 0]
    if not q:
        return None
    base = next((p for p in points if p.baseline), None)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for p in q:
        c, mk = styles[p.name]
        ax.scatter([p.bits_per_weight], [getattr(p, metric)], marker=mk, s=55, zorder=3, edgecolors=[c],
                   facecolors=[c], linewidths=1.4, label=p.label)
    front = pareto_front([(p.bits_per_weight, getattr(p, metric)) for p in q])
    fx = [q[i].bits_per_weight for i in front] + [max(p.bits_per_weight for p in q)]
    fy = [getattr(q[i], metric) for i in front]
    fy.append(fy[-1])  # the best so far holds to the largest size
    ax.plot(fx, fy, drawstyle="steps-post", color="0.35", linestyle="-", linewidth=1.2, zorder=2,
            label="Pareto front (lowest for its size)")
    ys = [getattr(p, metric) for p in q]
    if metric == "ppl" and base is not None and base.ppl is not None:
        bits = f", {base.bits_per_weight:.0f} bits/weight" if base.bits_per_weight else ""
        ax.axhline(base.ppl, color="black", linestyle="--", linewidth=1.0, zorder=1,
                   label=f"fp32 reference (ppl {base.ppl:.3f}{bits})")
        ys.append(base.ppl)
    _log_axis(ax, "y", ys)
    ax.set_xlabel(_BPW_LABEL)
    if metric == "ppl":
        ax.set_ylabel("perplexity (lower is better; log scale)" if ax.get_yscale() == "log"
                      else "perplexity (lower is better)")
    else:
        ax.set_ylabel("KL divergence to fp32 (nats per token; log scale)" if ax.get_yscale() == "log"
                      else "KL divergence to fp32 (nats per token)")
    xs = [p.bits_per_weight for p in q]
    lo, hi = min(xs), max(xs)
    pad = max(0.25, 0.06 * (hi - lo))
    ax.set_xlim(lo - pad, hi + pad)
    _finish(fig, ax, CHARTS["ppl_vs_bits" if metric == "ppl" else "kl_vs_bits"], subtitle)
    return fig


def _speed_chart(points: Sequence[Point], subtitle: str, threads: Any):
    styles = _styles(points)
    q = [p for p in points if p.weight_mb is not None and p.decode_tok_s is not None]
    if not q:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for p in q:
        c, mk = styles[p.name]
        label = p.label + (" [not a fast kernel]" if p.slow_kernel else "")
        ax.scatter([p.weight_mb], [p.decode_tok_s], marker=mk, s=55, zorder=3, edgecolors=[c],
                   facecolors="none" if p.slow_kernel else [c], linewidths=1.4, label=label)
    base = next((p for p in q if p.baseline), None)
    if base is not None:
        ax.axhline(base.decode_tok_s, color="black", linestyle="--", linewidth=1.0, zorder=1,
                   label=f"fp32 reference ({base.decode_tok_s:.1f} tokens/s, {base.weight_mb:.4g} MB)")
    _log_axis(ax, "y", [p.decode_tok_s for p in q])
    ax.set_xlabel("weight memory (MB = 10^6 bytes; all stored weights of the model)")
    th = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    ax.set_ylabel(f"decode speed (tokens/s, batch 1{th}; higher is better)")
    _finish(fig, ax, CHARTS["speed_vs_memory"], subtitle)
    return fig


def _time_chart(points: Sequence[Point], subtitle: str):
    styles = _styles(points)
    q = [p for p in points if not p.baseline and p.quantize_s is not None]
    if not q:
        return None
    fig = _figure(11.0, max(3.0, 1.2 + 0.32 * len(q)))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(q)))[::-1]
    ax.barh(ys, [max(p.quantize_s, 1e-3) for p in q], color=[styles[p.name][0] for p in q], zorder=2)
    ax.set_yticks(ys)
    ax.set_yticklabels([p.label for p in q], fontsize=8)
    for y, p in zip(ys, q):
        ax.text(max(p.quantize_s, 1e-3), y, f" {p.quantize_s:.3g} s", va="center", fontsize=8)
    _log_axis(ax, "x", [max(p.quantize_s, 1e-3) for p in q])
    scale = "; log scale" if ax.get_xscale() == "log" else ""
    ax.set_xlabel(f"quantization time (seconds, wall clock; calibration included{scale})")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * (1.6 if ax.get_xscale() == "log" else 1.15))  # room for the value labels
    _finish(fig, ax, CHARTS["quantize_time"], subtitle, legend=False)
    return fig


def _subtitle(result: dict[str, Any]) -> str:
    s = result.get("settings") or {}
    model = result.get("model") or s.get("model") or "?"
    win = f"{s.get('max_windows')} windows of {s.get('seqlen')} tokens" if s.get("seqlen") else ""
    return f"{model}" + (f", {win}" if win else "")


def render_chart(name: str, result: dict[str, Any], points: Sequence[Point] | None = None):
    """The matplotlib ``Figure`` of chart ``name`` (see :data:`CHARTS`), or None without data."""
    if name not in CHARTS:
        raise ValueError(f"chart must be one of {sorted(CHARTS)}, got {name!r}")
    points = chart_points(result) if points is None else points
    sub = _subtitle(result)
    if name == "ppl_vs_bits":
        return _quality_chart(points, "ppl", sub)
    if name == "kl_vs_bits":
        return _quality_chart(points, "kl", sub)
    if name == "speed_vs_memory":
        return _speed_chart(points, sub, (result.get("settings") or {}).get("threads"))
    return _time_chart(points, sub)


def _svg_bytes(fig, name: str) -> str:
    import matplotlib
    buf = io.StringIO()
    # text stays text; ids salted per chart so several charts can share one HTML page
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"polyquant-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def write_charts(result: dict[str, Any], folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Write every chart with data to ``folder/<name>.png`` and ``.svg`` (atomically).

    Returns chart name -> ``{"title", "png", "svg"}`` (paths) for the charts written, or
    ``{"title", "missing": reason}`` for those without data.
    """
    folder = Path(folder)
    points = chart_points(result)
    out: dict[str, dict[str, Any]] = {}
    for name, title in CHARTS.items():
        fig = render_chart(name, result, points)
        if fig is None:
            out[name] = {"title": title, "missing": "no finished run has the numbers this chart needs"}
            continue
        png = atomic_write_bytes(folder / f"{name}.png", _png_bytes(fig))
        svg = atomic_write_text(folder / f"{name}.svg", _svg_bytes(fig, name))
        out[name] = {"title": title, "png": png, "svg": svg}
    return out
