"""Mermaid text of a diagram model (:mod:`polyquant.report.diagram_model`), escaped for Mermaid."""
from __future__ import annotations

from polyquant.report.diagram_model import Flowchart, Message, Note, Sequence, _slug, _unique_ids

__all__ = ["flowchart_mermaid", "sequence_mermaid"]


def _mm_text(s: str) -> str:
    """Escape for Mermaid labels and messages (entity codes, as Mermaid documents them)."""
    out = []
    for ch in s:
        if ch in '"#;<>&|{}[]':
            out.append(f"#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


_MM_CLASSES = {"root": "fill:#ffe3e3,stroke:#b55", "method": "fill:#e8f0fe,stroke:#57a",
               "format": "fill:#e6f4ea,stroke:#4a7", "tool": "fill:#fff4e0,stroke:#b83",
               "source": "fill:#eeeeee,stroke:#777"}


def flowchart_mermaid(fc: Flowchart) -> str:
    _unique_ids([n.id for n in fc.nodes] + [c.id for c in fc.clusters])
    lines = [f"flowchart {fc.direction}"]
    label = lambda n: "<br/>".join(_mm_text(x) for x in n.lines)  # noqa: E731
    for n in fc.nodes:
        if n.cluster is None:
            lines.append(f'    {n.id}["{label(n)}"]:::{n.kind}')
    for c in fc.clusters:
        lines.append(f'    subgraph {c.id}["{_mm_text(c.title)}"]')
        lines.append("        direction TB")
        for n in fc.nodes:
            if n.cluster == c.id:
                lines.append(f'        {n.id}["{label(n)}"]:::{n.kind}')
        lines.append("    end")
    for e in fc.edges:
        if e.hidden:
            lines.append(f"    {e.src} ~~~ {e.dst}")
            continue
        arrow = ("<-.->" if e.both else "-.->") if e.dashed else ("<-->" if e.both else "-->")
        text = f'|"{_mm_text(e.label)}"|' if e.label else ""
        lines.append(f"    {e.src} {arrow}{text} {e.dst}")
    kinds = sorted({n.kind for n in fc.nodes})
    for k in kinds:
        if k in _MM_CLASSES:
            lines.append(f"    classDef {k} {_MM_CLASSES[k]}")
    return "\n".join(lines) + "\n"


def sequence_mermaid(sq: Sequence) -> str:
    _unique_ids([p for p, _ in sq.participants])
    pid = {p: f"p_{_slug(p)}" for p, _ in sq.participants}
    lines = ["sequenceDiagram"]
    for p, lab in sq.participants:
        lines.append(f"    participant {pid[p]} as {_mm_text(lab)}")
    opens: dict[int, list[str]] = {}
    closes: dict[int, int] = {}
    for fr in sq.fragments:
        for bi, (lab, start) in enumerate(fr.branches):
            opens.setdefault(start, []).append(f"{fr.kind if bi == 0 else 'else'} {_mm_text(lab)}")
        closes[fr.end] = closes.get(fr.end, 0) + 1
    depth = 1
    for i, it in enumerate(sq.items + [None]):
        for _ in range(closes.get(i, 0)):
            depth -= 1
            lines.append("    " * depth + "end")
        for o in opens.get(i, []):
            if o.startswith("else "):
                lines.append("    " * (depth - 1) + o)
            else:
                lines.append("    " * depth + o)
                depth += 1
        if it is None:
            break
        ind = "    " * depth
        if isinstance(it, Note):
            lines.append(f"{ind}Note over {pid[it.over]}: " + "<br/>".join(_mm_text(x) for x in it.lines))
        else:
            arrow = "-->>" if it.reply else "->>"
            lines.append(f"{ind}{pid[it.src]}{arrow}{pid[it.dst]}: {_mm_text(it.text)}")
    return "\n".join(lines) + "\n"
