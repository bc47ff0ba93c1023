"""Renderings of the compatibility matrix (:mod:`polyquant.report.matrix`): Markdown, JSON and an
HTML fragment (tables with classes, inline style only), from its rows alone."""
from __future__ import annotations

import html
import json
from typing import Any, Sequence

from polyquant.report.devices import DEVICE_CLASSES

__all__ = ["matrix_markdown", "matrix_json", "matrix_html"]


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


def _export_targets(rows: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(target, a cell of it)`` for every export target the rows carry, sorted by name (the cell
    gives the readers, the same in every row)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        for name, cell in (r.get("exports") or {}).items():
            seen.setdefault(name, cell)
    return sorted(seen.items())


def _export_label(name: str, cell: dict[str, Any]) -> str:
    readers = ", ".join(cell.get("readers") or []) or "no verified reader"
    return f"export {name} → {readers}"


def _export_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "?"
    if cell["exact"]:
        return f"{_YES} {cell.get('type') or 'as is'}"
    return f"{_NO} {cell.get('reason') or ''}".rstrip()


def _untested_lines(targets: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{tool} (reads {name}): not verified here: {why}"
            for name, cell in targets for tool, why in sorted((cell.get("untested_readers") or {}).items())]


def _declared_markdown(rows: Sequence[dict[str, Any]]) -> str:
    targets = _export_targets(rows)
    head = ["method", "bits", "setting"] + [d.label for d in DEVICE_CLASSES] + [_export_label(n, c)
                                                                              for n, c in targets]
    lines = ["Each device cell: quantize / run with the reference kernel / fast kernels (— none; cc: minimum "
             "CUDA compute capability). Each export cell: the target stores the layer's own codes and scales "
             "(✓ and its type) or why not (then `polyquant export` re-rounds or refuses it).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("error") and not r.get("devices"):
            cells = [f"error: {r['error']}"] + [""] * (len(DEVICE_CLASSES) + len(targets) - 1)
        else:
            cells = [_cell_text(r["devices"].get(d.key)) for d in DEVICE_CLASSES]
            cells += [_export_text((r.get("exports") or {}).get(n)) for n, _ in targets]
        lines.append("| " + " | ".join(_md(c) for c in [f"`{r['method']}`", r["bits"], r["setting"], *cells]) + " |")
    lines += ["", "Needs: " + "; ".join(f"{d.label}: {d.needs}" for d in DEVICE_CLASSES) + "."]
    untested = _untested_lines(targets)
    if untested:
        lines += ["", "Export readers not verified: " + "; ".join(untested) + "."]
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


def _export_html(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return '<td class="pq-no">?</td>'
    if cell["exact"]:
        return f'<td class="pq-fast pq-k">{_YES} {_e(cell.get("type") or "as is")}</td>'
    return f'<td class="pq-no" title="{_e(cell.get("reason"))}">{_NO} {_e(cell.get("reason"))}</td>'


def _declared_html(rows: Sequence[dict[str, Any]]) -> str:
    targets = _export_targets(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in ["method", "family", "bits", "setting"]) + "".join(
        f'<th title="{_e(d.needs)}">{_e(d.label)}</th>' for d in DEVICE_CLASSES) + "".join(
        f"<th>{_e(_export_label(n, c))}</th>" for n, c in targets)
    body = []
    for r in rows:
        lead = (f'<td class="pq-k">{_e(r["method"])}</td><td>{_e(r["family"])}</td><td>{_e(r["bits"])}</td>'
                f'<td>{_e(r["setting"])}</td>')
        if r.get("error") and not r.get("devices"):
            cells = f'<td class="pq-no" colspan="{len(DEVICE_CLASSES) + len(targets)}">{_e(r["error"])}</td>'
        else:
            cells = "".join(_cell_html(r["devices"].get(d.key)) for d in DEVICE_CLASSES)
            cells += "".join(_export_html((r.get("exports") or {}).get(n)) for n, _ in targets)
        body.append(f'<tr data-method="{_e(r["method"])}">{lead}{cells}</tr>')
    needs = "".join(f"<li><b>{_e(d.label)}</b>: {_e(d.needs)}</li>" for d in DEVICE_CLASSES)
    needs += "".join(f"<li>{_e(line)}</li>" for line in _untested_lines(targets))
    return (f'<table class="pq-matrix-declared"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f'<p class="pq-legend">Q: polyquant can quantize there; R: the reference kernel runs it; then the fast '
            f'kernels (cc: minimum CUDA compute capability; — none). Hover a cell for the reasons kernels '
            f'declined. Export columns: the target stores the layer\'s own codes and scales (its type), or '
            f'why not.</p><ul class="pq-legend">{needs}</ul>')


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
        body.append('<tr><td colspan="8">no quantized runs in these results</td></tr>')
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
