"""The summary table of a sweep (what ``polyquant compare`` prints and ``summary.md`` holds), from
``run_compare``'s result alone."""
from __future__ import annotations

from typing import Any

__all__ = ["SUMMARY_HEADERS", "summary_rows", "summary_markdown", "baseline_record", "bits_per_weight"]

SUMMARY_HEADERS = ["method", "setting", "ppl", "Δppl %", "KL", "top1", "bits/weight", "weight MB", "decode tok/s",
                   "vs fp32", "quantize s", "kernel", "status"]


def _m(rec: dict[str, Any] | None, key: str) -> Any:
    return ((rec or {}).get("metrics") or {}).get(key)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def baseline_record(result: dict[str, Any]) -> dict[str, Any] | None:
    """The finished unquantized run of a result, if any."""
    return next((r for r in result.get("runs", []) if r.get("config") is None and r.get("status") == "ok"), None)


def bits_per_weight(rec: dict[str, Any]) -> float | None:
    """Effective bits per weight of a record's quantized layers (scales and zeros counted)."""
    v = (rec.get("size") or {}).get("bits_per_weight")
    return float(v) if isinstance(v, (int, float)) else None


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table (see ``SUMMARY_HEADERS``) from a ``run_compare`` result."""
    recs = result.get("runs", [])
    base = baseline_record(result)
    rows = []
    base_ppl, base_dec = _m(base, "ppl"), _m(base, "decode_tok_s")
    for r in recs:
        ppl, dec, wb = _m(r, "ppl"), _m(r, "decode_tok_s"), _m(r, "weight_bytes")
        kernel = _m(r, "kernel") or ",".join(sorted(r.get("kernel") or {})) or "-"
        qs = (r.get("timings") or {}).get("quantize_s") if r.get("config") is not None else None
        rows.append([
            r.get("method", "?"), r.get("setting", ""),
            _fmt(ppl, ".3f"),
            _fmt(100 * (ppl / base_ppl - 1) if ppl is not None and base_ppl else None, "+.2f"),
            _fmt(_m(r, "kl"), ".4f"),
            _fmt(_m(r, "top1"), ".3f"),
            _fmt(bits_per_weight(r), ".2f"),
            _fmt(wb / 1e6 if wb is not None else None, ".1f"),
            _fmt(dec, ".1f"),
            _fmt(dec / base_dec if dec is not None and base_dec else None, ".2f"),
            _fmt(qs, ".1f"),
            kernel,
            "ok" if r.get("status") == "ok" else f"FAILED: {r.get('error', '')}"[:80],
        ])
    return rows


def summary_markdown(result: dict[str, Any]) -> str:
    """A Markdown summary of a result: settings, the table, failed and skipped runs."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    s = result.get("settings", {})
    cal = s.get("calibration") or {}
    recs = result.get("runs", [])
    failed = [r for r in recs if r.get("status") != "ok"]
    lines = [f"# polyquant compare: {cell(result.get('model', '?'))}", "",
             f"{len(recs)} runs ({len(failed)} failed); text: {s.get('text')}, {s.get('max_windows')} windows of "
             f"{s.get('seqlen')} tokens, {s.get('threads')} thread(s); decode {s.get('decode_tokens')} tokens "
             f"({s.get('slow_decode_tokens')} on kernels that are not fast paths); calibration: "
             f"{cal.get('samples')} x {cal.get('seqlen')} tokens of {cal.get('text')}. "
             f"Created {result.get('created', '?')}.", "",
             "| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + "---|" * len(SUMMARY_HEADERS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in summary_rows(result)]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r.get('name')}`: {cell(r.get('error'))}" for r in failed]
    skipped = result.get("skipped") or []
    if skipped:
        lines += ["", "## Left out of the run list", ""]
        lines += [f"- {cell(x.get('method'))} {cell(x.get('setting'))}: {cell(x.get('reason'))}" for x in skipped]
    lines += ["", "Charts, matrices and diagrams: `report.html`; every record: `results.json`.", ""]
    return "\n".join(lines)
