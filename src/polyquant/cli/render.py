"""Output of the command line: results on stdout, messages on stderr, tables and mappings."""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

__all__ = ["out", "err", "print_json", "text_table", "markdown_table", "print_mapping", "flat", "fmt_value"]


def out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_json(obj: Any, indent: int | None = 2) -> None:
    from polyquant.report.store import to_jsonable
    out(json.dumps(to_jsonable(obj), indent=indent, allow_nan=False))


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            items += flat(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v) if len(v) <= 12 else f"[{len(v)} items]"
    return str(v)


def print_mapping(d: dict[str, Any]) -> None:
    rows = flat(d)
    w = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        out(f"{k.ljust(w)}  {fmt_value(v)}")
