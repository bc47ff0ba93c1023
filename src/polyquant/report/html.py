"""The report of a ``compare`` sweep: ``report.html``, one self-contained page that opens with no
network (inline CSS, a small inline script that sorts the results table, charts and diagrams as
inline SVG), and the files written next to it.

:func:`write_report` writes, from a ``results.json`` payload:

* ``charts/<name>.png|svg`` (:mod:`polyquant.report.charts`);
* ``matrix.md`` / ``matrix.json``: the declared and probed hardware compatibility matrices
  (:mod:`polyquant.report.matrix`);
* ``summary.md``: settings, the summary table, failed and skipped runs;
* ``report.html``: the results table (sortable), the charts, the matrices, the diagrams
  (:mod:`polyquant.report.diagrams`: each SVG inline, its Mermaid text in a ``<details>``), the
  environment and the settings.

Nothing on the page is fetched: inlined SVGs lose their XML prologue, metadata and namespace
declarations (the HTML parser does not need them) and their ids are prefixed per figure so
several SVGs can share the page. A section whose generator fails is replaced by its error (the
sweep's records are never lost to a report problem); the error is logged.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from polyquant.report.store import atomic_write_text

__all__ = ["write_report", "render_html", "inline_svg", "results_table", "REPORT_FILE"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

_COLUMNS: list[tuple[str, str, str]] = [  # (header, key, title)
    ("run", "name", "run name"),
    ("method", "method", "registered method"),
    ("setting", "setting", "the config's label"),
    ("ppl", "ppl", "perplexity on the evaluation windows (lower is better)"),
    ("Δppl %", "dppl", "perplexity change against fp32"),
    ("KL", "kl", "mean KL divergence to fp32's next-token distribution (nats)"),
    ("top-1", "top1", "share of positions whose most likely token agrees with fp32"),
    ("bits/weight", "bpw", "effective bits per weight of the quantized layers (scales and zeros counted)"),
    ("weight MB", "wmb", "stored weights of the whole model, 10^6 bytes"),
    ("decode tok/s", "dec", "greedy decode tokens per second, batch 1"),
    ("vs fp32", "speedup", "decode speed relative to fp32"),
    ("prefill tok/s", "pre", "prefill tokens per second, one window"),
    ("quantize s", "qs", "quantization wall seconds (calibration included)"),
    ("eval s", "es", "evaluation wall seconds"),
    ("kernel", "kernel", "kernels the quantized layers ran with"),
    ("status", "status", "ok, or the error"),
]

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#ffffff; --head:#f3f5f9; --accent:#2f5fb3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
main { max-width: 1560px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
p.lead { color: var(--muted); margin: 0 0 12px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--head); }
td { white-space: nowrap; } td.wrap { white-space: normal; min-width: 12em; }
td.status { max-width: 24em; overflow: hidden; text-overflow: ellipsis; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.failed td { background: #fff1f1; } tr.baseline td { background: #f4f8ff; } tr.front td.name { font-weight: 600; }
figure { margin: 12px 0 24px; } figcaption { color: var(--muted); font-size: 13px; }
figure.chart svg, figure.diagram svg { display: block; max-width: 100%; height: auto; }
details { margin: 6px 0 0; } pre { background: var(--head); padding: 8px; overflow-x: auto; font-size: 12px; }
.error { color: #a01c1c; } .muted { color: var(--muted); }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; word-break: break-word; }
"""

# Click a header to sort by it (numbers by their data-v value, missing values last); again to reverse.
_JS = """
(function () {
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      var sort = function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var key = function (row) {
          var c = row.cells[col], v = c.getAttribute('data-v');
          if (v === null) { return {n: false, s: c.textContent.trim().toLowerCase()}; }
          if (v === '') { return {n: true, missing: true}; }
          return {n: true, v: parseFloat(v)};
        };
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x.missing || y.missing) { return (x.missing ? 1 : 0) - (y.missing ? 1 : 0); }
          var d = x.n && y.n ? x.v - y.v : (x.s < y.s ? -1 : x.s > y.s ? 1 : 0);
          return asc ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      };
      th.addEventListener('click', sort);
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') { sort(); } });
    });
  });
})();
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


# -- inline SVG --------------------------------------------------------------------------------

_PROLOGUE = re.compile(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<!--.*?-->", re.S | re.I)
_METADATA = re.compile(r"<metadata\b.*?</metadata>", re.S | re.I)
_XMLNS = re.compile(r'\s+xmlns(:\w+)?\s*=\s*"[^"]*"')


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG document made fit to sit inside an HTML page: no XML prologue, doctype, comments,
    metadata or namespace declarations (nothing that names a URL), and every ``id`` prefixed with
    ``prefix`` (references through ``#id`` follow) so that ids of several SVGs never collide."""
    if not isinstance(svg, str) or "<svg" not in svg:
        raise ValueError(f"svg must be an SVG document, got {str(svg)[:40]!r}")
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", prefix)
    s = _METADATA.sub("", _PROLOGUE.sub("", svg)).strip()
    s = _XMLNS.sub("", s)
    ids = set(re.findall(r'\bid="([^"]+)"', s))
    if ids:
        s = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', s)

        def ref(m: re.Match) -> str:
            name = m.group(2)
            return f"{m.group(1)}{prefix}-{name}" if name in ids else m.group(0)

        s = re.sub(r'(url\(\s*["\']?#)([^)"\'\s]+)', ref, s)
        s = re.sub(r'((?:xlink:)?href="#)([^"]+)', ref, s)
    return s


# -- sections ----------------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _cell(v: Any, spec: str | None = None, cls: str = "num") -> str:
    n = _num(v)
    if spec is None:
        return f"<td>{_e(v if v is not None else '-')}</td>"
    if n is None:
        return f'<td class="{cls}" data-v="">-</td>'
    return f'<td class="{cls}" data-v="{n!r}">{_e(format(n, spec))}</td>'


def _pareto_names(result: dict[str, Any]) -> set[str]:
    from polyquant.report.charts import chart_points, pareto_front
    pts = [p for p in chart_points(result) if not p.baseline and p.bits_per_weight is not None and p.ppl is not None]
    return {pts[i].name for i in pareto_front([(p.bits_per_weight, p.ppl) for p in pts])}


def results_table(result: dict[str, Any]) -> str:
    """The sortable results table (one row per run) as an HTML fragment."""
    from polyquant.report.compare import baseline_record, bits_per_weight
    recs = result.get("runs", [])
    base = baseline_record(result) or {}
    bm = base.get("metrics") or {}
    base_ppl, base_dec = _num(bm.get("ppl")), _num(bm.get("decode_tok_s"))
    front = _pareto_names(result)
    head = "".join(f'<th scope="col" title="{_e(t)}">{_e(h)}</th>' for h, _, t in _COLUMNS)
    rows = []
    for r in recs:
        m = r.get("metrics") or {}
        ok = r.get("status") == "ok"
        ppl, dec = _num(m.get("ppl")), _num(m.get("decode_tok_s"))
        t = r.get("timings") or {}
        kernel = ", ".join(f"{k} x{n}" for k, n in sorted((r.get("kernel") or {}).items())) or "-"
        status = "ok" if ok else f"failed: {r.get('error', '')}"
        cls = " ".join(c for c, on in (("failed", not ok), ("baseline", r.get("config") is None),
                                        ("front", r.get("name") in front)) if on)
        cells = [
            f'<td class="name">{_e(r.get("name"))}</td>', _cell(r.get("method")),
            f'<td class="wrap">{_e(r.get("setting"))}</td>',
            _cell(ppl, ".3f"),
            _cell(100 * (ppl / base_ppl - 1) if ppl is not None and base_ppl else None, "+.2f"),
            _cell(m.get("kl"), ".4f"), _cell(m.get("top1"), ".3f"), _cell(bits_per_weight(r), ".2f"),
            _cell(_num(m.get("weight_bytes")) / 1e6 if _num(m.get("weight_bytes")) is not None else None, ".1f"),
            _cell(dec, ".1f"), _cell(dec / base_dec if dec is not None and base_dec else None, ".2f"),
            _cell(m.get("prefill_tok_s"), ".0f"),
            _cell(t.get("quantize_s") if r.get("config") is not None else None, ".1f"),
            _cell(t.get("eval_s"), ".1f"), _cell(kernel), f'<td class="status" title="{_e(status)}">{_e(status)}</td>',
        ]
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="results-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _kv(d: dict[str, Any]) -> str:
    items = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv}" for kk, vv in v.items())
        items.append(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>")
    return '<dl class="kv">' + "".join(items) + "</dl>"


def _charts_section(charts: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, info in charts.items():
        title = info.get("title", name)
        if "svg" not in info:
            parts.append(f'<figure class="chart missing" id="chart-{_e(name)}"><h3>{_e(title)}</h3>'
                         f'<p class="muted">{_e(info.get("missing", "not drawn"))}</p></figure>')
            continue
        svg = inline_svg(Path(info["svg"]).read_text(encoding="utf-8"), f"chart-{name}")
        files = " and ".join(f"charts/{Path(info[k]).name}" for k in ("png", "svg") if k in info)
        parts.append(f'<figure class="chart" id="chart-{_e(name)}" role="img" aria-label="{_e(title)}">{svg}'
                     f"<figcaption>{_e(title)} (also {_e(files)})</figcaption></figure>")
    return "".join(parts)


def _diagrams_section(diagrams: dict[str, Any]) -> str:
    parts = []
    for key, d in diagrams.items():
        name = getattr(d, "name", key)
        svg = inline_svg(d.svg, f"diagram-{name}")
        parts.append(f'<figure class="diagram" id="diagram-{_e(name)}"><h3>{_e(d.title)}</h3>{svg}'
                     f"<details><summary>Mermaid source</summary><pre>{_e(d.mermaid)}</pre></details></figure>")
    return "".join(parts)


def _failed_and_skipped(result: dict[str, Any]) -> str:
    failed = [r for r in result.get("runs", []) if r.get("status") != "ok"]
    skipped = result.get("skipped") or []
    out = []
    if failed:
        out.append("<h3>Failed runs</h3><ul>" + "".join(
            f"<li><b>{_e(r.get('name'))}</b>: {_e(r.get('error'))}</li>" for r in failed) + "</ul>")
    if skipped:
        out.append("<h3>Left out of the run list</h3><ul>" + "".join(
            f"<li>{_e(s.get('method'))} {_e(s.get('setting'))}: {_e(s.get('reason'))}</li>" for s in skipped)
            + "</ul>")
    return "".join(out)


def _invocations(inv: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_e(x.get('started'))}</td>{_cell(x.get('wall_s'), '.0f')}{_cell(x.get('cpu_s'), '.0f')}"
                   f"{_cell(x.get('runs'), '.0f')}{_cell(x.get('reused'), '.0f')}</tr>" for x in inv if isinstance(x, dict))
    return ("<h3>Sweep invocations</h3><table><thead><tr><th>started (UTC)</th><th>wall s</th><th>CPU s</th>"
            f"<th>runs</th><th>reused</th></tr></thead><tbody>{rows}</tbody></table>")


def _guard(what: str, fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # a report section must not lose the sweep; the error is shown and logged
        log.warning("report: %s could not be rendered: %s: %s", what, type(e).__name__, e)
        return f'<p class="error">{_e(what)} could not be rendered: {_e(type(e).__name__)}: {_e(e)}</p>'


def _lead(result: dict[str, Any]) -> str:
    s = result.get("settings") or {}
    cal = s.get("calibration") or {}
    recs = result.get("runs", [])
    failed = sum(r.get("status") != "ok" for r in recs)
    th = s.get("threads")
    return (f"{len(recs)} runs ({failed} failed) on <b>{_e(result.get('model'))}</b>, evaluated on the same "
            f"{_e(s.get('max_windows'))} windows of {_e(s.get('seqlen'))} tokens of {_e(s.get('text'))}; speed at "
            f"{_e(th)} thread(s), decoding {_e(s.get('decode_tokens'))} tokens ({_e(s.get('slow_decode_tokens'))} "
            f"on kernels that are not fast paths); calibration-based methods used {_e(cal.get('samples'))} x "
            f"{_e(cal.get('seqlen'))} tokens of {_e(cal.get('text'))}. Created {_e(result.get('created'))}.")


def render_html(result: dict[str, Any], charts: dict[str, dict[str, Any]] | None = None, *,
                matrices: tuple[Any, Any] | Callable[[], tuple[Any, Any]] | None = None,
                diagrams: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> str:
    """The report page. ``charts``: :func:`polyquant.report.charts.write_charts`'s result;
    ``matrices``: ``(declared, probed)`` rows (or a callable returning them; default: computed);
    ``diagrams``: name -> Diagram (or a callable; default: ``all_diagrams()``)."""
    def matrix_fragment() -> str:
        from polyquant.report import matrix as mx
        declared, probed = (matrices() if callable(matrices) else matrices) if matrices is not None else (
            mx.declared_matrix(), mx.probed_matrix(result.get("runs", [])))
        return f'<div class="scroll">{mx.matrix_html(declared, probed)}</div>'

    def diagram_fragment() -> str:
        if diagrams is None:
            from polyquant.report.diagrams import all_diagrams
            ds = all_diagrams()
        else:
            ds = diagrams() if callable(diagrams) else diagrams
        return _diagrams_section(ds)

    model = result.get("model", "?")
    env = result.get("environment") or {}
    settings = dict(result.get("settings") or {})
    invocations = result.get("invocations") or ([result["sweep"]] if isinstance(result.get("sweep"), dict) else [])
    sections = [
        ("results", "Results", '<p class="muted">Click a column header to sort. Bold run names are on the '
                               "perplexity / bits-per-weight Pareto front; blue: the fp32 reference; red: failed."
                               "</p>" + _guard("the results table", lambda: results_table(result))
         + _failed_and_skipped(result)),
        ("charts", "Charts", _guard("the charts", lambda: _charts_section(charts or {}))),
        ("matrix", "Hardware compatibility", '<p class="muted">Declared: what the registry and kernels say '
                                             "for each device class. Probed: what ran on this machine in this "
                                             "sweep, with the kernel used.</p>"
         + _guard("the compatibility matrix", matrix_fragment)),
        ("diagrams", "Diagrams", _guard("the diagrams", diagram_fragment)),
        ("environment", "Environment and settings",
         "<h3>Settings</h3>" + _kv(settings) + "<h3>Environment</h3>" + _kv(env)
         + (_invocations(invocations) if invocations else "")),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>polyquant compare: {_e(model)}</title><style>{_CSS}</style></head>"
            f"<body><main><h1>polyquant compare: {_e(model)}</h1><p class=\"lead\">{_lead(result)}</p>"
            f"<nav>{nav}</nav>{body}</main><script>{_JS}</script></body></html>\n")


def _matrix_files(folder: Path, result: dict[str, Any]) -> tuple[list[Path], tuple[Any, Any] | None]:
    try:
        from polyquant.report import matrix as mx
        declared = mx.declared_matrix()
        probed = mx.probed_matrix(result.get("runs", []))
        md = ("# Hardware compatibility\n\n## Declared\n\n" + mx.matrix_markdown(declared).rstrip() + "\n\n"
              f"## Probed (this sweep, {result.get('model', '?')})\n\n" + mx.matrix_markdown(probed).rstrip() + "\n")
        js = json.dumps({"declared": json.loads(mx.matrix_json(declared)),
                         "probed": json.loads(mx.matrix_json(probed))}, indent=2) + "\n"
    except Exception as e:  # logged; the page shows the error too
        log.warning("report: the compatibility matrix could not be written: %s: %s", type(e).__name__, e)
        return [], None
    return [atomic_write_text(folder / "matrix.md", md), atomic_write_text(folder / "matrix.json", js)], (declared,
                                                                                                          probed)


def write_report(folder: str | os.PathLike, result: dict[str, Any] | None = None) -> list[Path]:
    """Write the report files of a sweep into ``folder`` (``result`` default: its results.json);
    returns the paths written, ``report.html`` last."""
    from polyquant.report.charts import write_charts
    from polyquant.report.compare import summary_markdown
    folder = Path(folder)
    if result is None:
        result = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        raise ValueError("result must be a compare result with a 'runs' list")
    charts = write_charts(result, folder / "charts")
    paths = [Path(info[k]) for info in charts.values() for k in ("png", "svg") if k in info]
    mpaths, matrices = _matrix_files(folder, result)
    paths += mpaths
    paths.append(atomic_write_text(folder / "summary.md", summary_markdown(result)))
    page = render_html(result, charts, matrices=matrices)
    paths.append(atomic_write_text(folder / REPORT_FILE, page))
    return paths
