"""The overview's diagrams, generated from the registries so they never go stale.

This module owns the three diagrams and their two renderings:

* ``technique-map``: the registered methods grouped by family (``methods.registry.FAMILIES``),
  each with its traits (bits, calibration, activations, formats);
* ``pipeline``: the quantization pipeline as a sequence diagram (user -> CLI -> load ->
  configure -> calibrate -> quantize -> kernels -> save -> load -> evaluate), with the methods
  that need data, the formats and the kernels read from their registries;
* ``integration``: polyquant's formats (the format registry) and the tools that read or write
  each (each ``Format``'s ``readers`` / ``writers``), plus the inputs polyquant reads (a float
  Hugging Face folder, a llama.cpp GGUF).

Each diagram is first built as one small model (nodes, clusters and edges for a flowchart;
participants, messages, notes and alt-fragments for a sequence), and both renderings come from
that model, so they always agree: Mermaid text for Markdown, and a self-contained SVG laid out
here (layered boxes, labels sized to fit in a monospace font, curved arrows; no mermaid.js, no
fonts, scripts or anything fetched). Text is escaped for each target.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Iterable
from xml.sax.saxutils import escape as _xml_escape

__all__ = ["Diagram", "Node", "Edge", "Cluster", "Flowchart", "Message", "Note", "Fragment", "Sequence",
           "technique_map", "pipeline", "integration_graph", "all_diagrams", "tool_name", "format_tools",
           "technique_map_model", "pipeline_model", "integration_model", "flowchart_mermaid", "sequence_mermaid",
           "flowchart_svg", "sequence_svg", "DIAGRAM_NAMES"]

DIAGRAM_NAMES = ("technique-map", "pipeline", "integration")


@dataclass(frozen=True)
class Diagram:
    """One diagram: ``name`` (file stem), ``title``, ``mermaid`` (Mermaid text for Markdown) and
    ``svg`` (a standalone SVG document rendered offline from the same model)."""

    name: str
    title: str
    mermaid: str
    svg: str


# -- the models -------------------------------------------------------------------------------

@dataclass
class Node:
    """A box. ``lines``: the label (first line bold); ``kind``: fill colour / Mermaid class;
    ``rank``: the layer it is drawn in; ``cluster``: the cluster id it belongs to (or None)."""

    id: str
    lines: list[str]
    kind: str = "box"
    rank: int = 0
    cluster: str | None = None


@dataclass
class Cluster:
    """A titled group of nodes drawn as one column inside its rank."""

    id: str
    title: str
    rank: int = 0


@dataclass
class Edge:
    """An arrow ``src -> dst`` (node or cluster ids); ``both``: arrowheads at both ends;
    ``hidden``: layout only (Mermaid ``~~~``, not drawn)."""

    src: str
    dst: str
    label: str = ""
    both: bool = False
    dashed: bool = False
    hidden: bool = False


@dataclass
class Flowchart:
    direction: str  # "LR" (ranks are columns) or "TB" (ranks are rows)
    nodes: list[Node]
    edges: list[Edge] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)


@dataclass
class Message:
    src: str
    dst: str
    text: str
    reply: bool = False


@dataclass
class Note:
    over: str
    lines: list[str]


@dataclass
class Fragment:
    """``alt`` (or ``opt`` / ``loop``) over items ``[start, end)``; ``branches``: ``(label, start)``,
    the first branch starting at the fragment's start."""

    kind: str
    branches: list[tuple[str, int]]
    end: int


@dataclass
class Sequence:
    participants: list[tuple[str, str]]  # (id, label)
    items: list[Message | Note]
    fragments: list[Fragment] = field(default_factory=list)


# -- registry data ----------------------------------------------------------------------------

_TOOL_ALIASES = {"llmcompressor": "llm-compressor", "autoawq": "autoawq", "auto-gptq": "autogptq",
                 "quanto": "optimum-quanto", "vllm": "vllm"}
_TOOL_LABELS = {"transformers": "transformers", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI",
                "autoawq": "AutoAWQ", "llm-awq": "llm-awq", "gptqmodel": "GPTQModel", "autogptq": "AutoGPTQ",
                "optimum": "optimum", "exllamav2": "ExLlamaV2", "bitsandbytes": "bitsandbytes", "peft": "PEFT",
                "hqq": "hqq", "optimum-quanto": "optimum-quanto", "torchao": "torchao",
                "compressed-tensors": "compressed-tensors", "llm-compressor": "llm-compressor", "eetq": "EETQ",
                "deepseek": "DeepSeek-V3 inference", "llama.cpp": "llama.cpp", "fbgemm": "FBGEMM"}


def tool_name(entry: str) -> list[tuple[str, str]]:
    """Canonical ``(tool, qualifier)`` pairs of one ``readers`` / ``writers`` entry:
    ``"transformers (< 5: HqqConfig)"`` -> ``[("transformers", "< 5: HqqConfig")]``,
    ``"transformers + bitsandbytes"`` -> both tools, ``"llmcompressor"`` -> ``"llm-compressor"``."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"a reader/writer entry must be a non-empty string, got {entry!r}")
    m = re.match(r"^\s*([^()]*?)\s*(?:\((.*)\))?\s*$", entry)
    base, qual = (m.group(1), (m.group(2) or "").strip()) if m else (entry, "")
    out = []
    for part in base.split("+"):
        key = part.strip().lower()
        if key:
            out.append((_TOOL_ALIASES.get(key, key), qual))
    return out


def _tool_label(key: str) -> str:
    return _TOOL_LABELS.get(key, key)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def _methods():
    from polyquant.methods import METHODS
    return [METHODS[k] for k in sorted(METHODS)]


def _formats():
    import polyquant.formats as formats
    return list(formats.list_formats())


# -- (a) technique map ------------------------------------------------------------------------

def technique_map_model() -> Flowchart:
    from polyquant.methods.registry import FAMILIES
    methods = _methods()
    by_family: dict[str, list] = {f: [] for f in FAMILIES}
    for s in methods:
        by_family.setdefault(s.family, []).append(s)
    empty = [f for f, ms in by_family.items() if not ms]
    root_lines = [f"polyquant: {len(methods)} methods", f"in {len(FAMILIES) - len(empty)} families"]
    if empty:
        root_lines.append("none yet: " + ", ".join(empty))
    nodes = [Node("root", root_lines, "root", 0)]
    clusters, edges = [], []
    for fam, specs in by_family.items():
        if not specs:
            continue
        cid = "fam_" + _slug(fam)
        clusters.append(Cluster(cid, f"{fam} ({len(specs)})", 1))
        edges.append(Edge("root", cid))
        prev = None
        for s in specs:
            acts = "weight-only" if s.activations in ("", "none") else "act: " + s.activations
            lines = [s.name, f"bits {','.join(str(b) for b in s.bits)}",
                     "calibration: needs data" if s.needs_calibration else "calibration: none"]
            lines += _wrap(acts, 34) + _wrap("formats: " + ", ".join(s.formats), 34)
            nid = "m_" + _slug(s.name)
            nodes.append(Node(nid, lines, "method", 1, cid))
            if prev is not None:
                edges.append(Edge(prev, nid, hidden=True))
            prev = nid
    return Flowchart("TB", nodes, edges, clusters)


# -- (b) pipeline -----------------------------------------------------------------------------

def pipeline_model() -> Sequence:
    from polyquant.kernels import list_kernels
    methods = _methods()
    calib = [s.name for s in methods if s.needs_calibration]
    plain = [s.name for s in methods if not s.needs_calibration]
    fmts = [f.name for f in _formats()]
    kernels = [k.name for k in list_kernels()]
    parts = [("user", "User"), ("cli", "polyquant CLI"), ("models", "models.load_model"),
             ("methods", f"methods ({len(methods)})"), ("calib", "calibration driver"),
             ("nn", "methods.quantize_model"), ("kernels", f"kernels ({len(kernels)})"),
             ("formats", f"formats ({len(fmts)})"), ("eval", "eval.evaluate")]
    items: list[Message | Note] = [
        Message("user", "cli", "polyquant quantize MODEL --method M -o DIR"),
        Message("cli", "models", "load: default | HF folder | .gguf"),
        Message("models", "cli", "float model + tokenizer", reply=True),
        Message("cli", "methods", "configure: MethodConfig(flags).validate()"),
    ]
    frags = []
    start = len(items)
    items += [Note("methods", _wrap(", ".join(calib) or "(none registered)", 44)),
              Message("cli", "calib", "calibrate: calibration_data(tokenizer)"),
              Message("cli", "nn", "quantize_model(model, config, data)"),
              Message("nn", "calib", "run_sequential: one block at a time"),
              Message("calib", "methods", "quantize_weight(W, config, stats)")]
    other = len(items)
    items += [Note("methods", _wrap(", ".join(plain) or "(none registered)", 44)),
              Message("cli", "nn", "quantize_model(model, config)"),
              Message("nn", "methods", "quantize_weight(W, config, None)")]
    frags.append(Fragment("alt", [(f"needs calibration data ({len(calib)} methods)", start),
                                  (f"no data ({len(plain)} methods)", other)], len(items)))
    items += [
        Message("methods", "nn", "QuantizedWeight (codes, scales, zeros)", reply=True),
        Message("nn", "kernels", "select_kernel(qw, device) -> QuantLinear"),
        Note("kernels", _wrap(", ".join(kernels), 40)),
        Message("cli", "formats", "save(model, DIR, format)"),
        Note("formats", _wrap(", ".join(fmts), 40)),
        Message("user", "cli", "polyquant eval DIR (or compare)"),
        Message("cli", "formats", "load(DIR): format from config.json"),
        Message("formats", "kernels", "select kernels on the device"),
        Message("cli", "eval", "evaluate(): ppl, KL, top-1, bytes, tok/s"),
        Message("eval", "user", "results (compare: results.json)", reply=True),
    ]
    return Sequence(parts, items, frags)


# -- (c) integration graph --------------------------------------------------------------------

def format_tools(fmt) -> dict[str, dict[str, object]]:
    """``tool -> {"reads": bool, "writes": bool, "note": str}`` for one format object."""
    tools: dict[str, dict[str, object]] = {}
    for attr, flag in (("readers", "reads"), ("writers", "writes")):
        for entry in getattr(fmt, attr, ()) or ():
            for tool, qual in tool_name(entry):
                t = tools.setdefault(tool, {"reads": False, "writes": False, "note": ""})
                t[flag] = True
                if qual and qual not in str(t["note"]):
                    t["note"] = f"{t['note']}; {qual}" if t["note"] else qual
    return tools


def integration_model() -> Flowchart:
    fmts = _formats()
    nodes = [Node("src_gguf", ["GGUF file", "(llama.cpp)"], "source", 0),
             Node("src_hf", ["float HF folder", "(transformers)"], "source", 0),
             Node("polyquant", ["polyquant", "quantize / save / load"], "root", 1)]
    edges = [Edge("src_gguf", "polyquant", "load_model (dequantized)"),
             Edge("src_hf", "polyquant", "load_model"),
             Edge("polyquant", "src_hf", "convert", dashed=True),
             Edge("polyquant", "formats", "save / load", both=True)]
    clusters = [Cluster("formats", f"polyquant formats ({len(fmts)})", 2)]
    tool_edges: list[Edge] = []
    tools: dict[str, str] = {}
    for f in fmts:
        fid = "f_" + _slug(f.name)
        nodes.append(Node(fid, [f.name, f"quant_method: {f.quant_method}"], "format", 2, "formats"))
        for tool, info in sorted(format_tools(f).items()):
            tid = tools.setdefault(tool, "t_" + _slug(tool))
            if info["reads"]:
                tool_edges.append(Edge(fid, tid, str(info["note"]), both=bool(info["writes"])))
            else:
                tool_edges.append(Edge(tid, fid, str(info["note"])))
    from polyquant.export import list_exporters  # export targets: files another runtime reads
    exps = list(list_exporters().values())
    if exps:
        clusters.append(Cluster("exports", f"polyquant export ({len(exps)})", 2))
        edges.append(Edge("polyquant", "exports", "export"))
    for x in exps:
        xid = "x_" + _slug(x.name)
        nodes.append(Node(xid, [f"{x.name} ({x.suffix})", "export only"], "format", 2, "exports"))
        for entry in x.readers:
            for tool, qual in tool_name(entry):
                tool_edges.append(Edge(xid, tools.setdefault(tool, "t_" + _slug(tool)), qual))
    for tool, tid in sorted(tools.items(), key=lambda kv: _tool_label(kv[0]).lower()):
        nodes.append(Node(tid, [_tool_label(tool)], "tool", 3))
    legend = ["format -> tool: the tool reads it", "tool -> format: the tool writes it",
              "<-> both; the label qualifies"]
    return Flowchart("LR", nodes, edges + tool_edges, clusters, legend)


# -- Mermaid ----------------------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", s)


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


def _unique_ids(ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"diagram id {i!r} is used twice (two registry names map to the same id)")
        seen.add(i)


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


# -- SVG: shared ------------------------------------------------------------------------------

_FONT = "DejaVu Sans Mono, Menlo, Consolas, Liberation Mono, monospace"
_FS = 12          # font size (px)
_CW = 7.4         # advance of one monospace character at 12 px (0.6 em + margin)
_LH = 16          # line height
_PAD = 8
_FILL = {"root": ("#ffe3e3", "#b55"), "method": ("#e8f0fe", "#57a"), "format": ("#e6f4ea", "#4a7"),
         "tool": ("#fff4e0", "#b83"), "source": ("#eeeeee", "#777"), "participant": ("#e8f0fe", "#57a"),
         "note": ("#fffbe6", "#bb9"), "box": ("#f4f4f4", "#888")}


def _tw(s: str) -> float:
    return len(s) * _CW


def _x(s: str) -> str:
    """Escape text for SVG element content and attribute values."""
    return _xml_escape(s, {'"': "&quot;", "'": "&apos;"})


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, s: str, anchor: str = "middle", bold: bool = False, size: int = _FS,
          fill: str = "#222") -> str:
    w = ' font-weight="bold"' if bold else ""
    return (f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}" font-size="{size}" fill="{fill}"{w}>'
            f"{_x(s)}</text>")


def _svg_doc(name: str, title: str, width: float, height: float, body: list[str]) -> str:
    mid = f"pqd-{_slug(name)}"
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" height="{_f(height)}" '
            f'viewBox="0 0 {_f(width)} {_f(height)}" font-family="{_FONT}" font-size="{_FS}" role="img" '
            f'aria-labelledby="{mid}-title" class="pq-diagram" data-diagram="{_x(name)}">'
            f'<title id="{mid}-title">{_x(title)}</title>'
            f'<defs><marker id="{mid}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#556"/></marker>'
            f'</defs><rect x="0" y="0" width="{_f(width)}" height="{_f(height)}" fill="#ffffff"/>')
    return head + "".join(body) + "</svg>\n"


def _marker(name: str) -> str:
    return f"url(#pqd-{_slug(name)}-arrow)"


# -- SVG: flowchart ---------------------------------------------------------------------------

@dataclass
class _Box:
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2


def _node_size(n: Node) -> tuple[float, float]:
    return max(_tw(s) for s in n.lines) + 2 * _PAD + 4, len(n.lines) * _LH + 2 * _PAD - 2


_CL_TITLE = 22
_GAP = 12


def _order_ranks(fc: Flowchart, items: dict[int, list[str]], members: dict[str, list[Node]],
                 rank_of: dict[str, int]) -> None:
    """Barycenter ordering inside ranks (a few sweeps) to cut edge crossings: each top-level item
    (node or cluster) and each cluster member moves to the mean position of its neighbours in
    other ranks. ``items`` and ``members`` are reordered in place."""
    adj: dict[str, list[str]] = {}
    for e in fc.edges:
        if not e.hidden:
            adj.setdefault(e.src, []).append(e.dst)
            adj.setdefault(e.dst, []).append(e.src)

    def positions() -> dict[str, float]:
        pos: dict[str, float] = {}
        for its in items.values():
            slots: list[str] = []
            for i in its:
                slots += [m.id for m in members[i]] if i in members else [i]
            for k, i in enumerate(slots):
                pos[i] = (k + 0.5) / len(slots)
            for i in its:
                if members.get(i):
                    pos[i] = sum(pos[m.id] for m in members[i]) / len(members[i])
        return pos

    def bary(i: str, pos: dict[str, float]) -> float:
        ids = [i] + [m.id for m in members.get(i, [])]
        nb = [pos[n] for j in ids for n in adj.get(j, []) if n in pos and rank_of.get(n) != rank_of.get(i)]
        return sum(nb) / len(nb) if nb else pos.get(i, 0.0)

    for _ in range(4):
        pos = positions()
        for r in items:
            items[r].sort(key=lambda i: bary(i, pos))
        pos = positions()
        for ms in members.values():
            ms.sort(key=lambda m: bary(m.id, pos))


def flowchart_svg(fc: Flowchart, name: str, title: str) -> str:
    _unique_ids([n.id for n in fc.nodes] + [c.id for c in fc.clusters])
    rank_of = {n.id: n.rank for n in fc.nodes}
    rank_of.update({c.id: c.rank for c in fc.clusters})
    members: dict[str, list[Node]] = {c.id: [] for c in fc.clusters}
    items: dict[int, list[str]] = {}
    for n in fc.nodes:
        if n.cluster is None:
            items.setdefault(n.rank, []).append(n.id)
        elif n.cluster in members:
            members[n.cluster].append(n)
        else:
            raise ValueError(f"node {n.id!r} names an unknown cluster {n.cluster!r}")
    for c in fc.clusters:
        items.setdefault(c.rank, []).append(c.id)
    if fc.direction == "LR":
        _order_ranks(fc, items, members, rank_of)
    boxes: dict[str, _Box] = {}
    size: dict[str, tuple[float, float]] = {n.id: _node_size(n) for n in fc.nodes}
    for c in fc.clusters:
        ms = members[c.id]
        w = max([size[m.id][0] for m in ms] + [_tw(c.title) + 8]) + 2 * _PAD
        h = _CL_TITLE + sum(size[m.id][1] for m in ms) + _GAP * max(len(ms) - 1, 0) + 2 * _PAD
        size[c.id] = (w, h)
    ranks = sorted(items)
    # gaps between ranks: room for the widest edge label that crosses them
    lab_w: dict[int, float] = {}
    for e in fc.edges:
        if e.hidden or not e.label:
            continue
        lo = min(rank_of[e.src], rank_of[e.dst])
        lab_w[lo] = max(lab_w.get(lo, 0.0), _tw(e.label) + 16)
    margin = 16.0
    title_h = 28.0
    if fc.direction == "LR":
        x = margin
        col_h = {r: sum(size[i][1] for i in items[r]) + 2 * _GAP * max(len(items[r]) - 1, 0) for r in ranks}
        total_h = max(col_h.values())
        for r in ranks:
            cw = max(size[i][0] for i in items[r])
            y = title_h + (total_h - col_h[r]) / 2
            for i in items[r]:
                w, h = size[i]
                boxes[i] = _Box(x + (cw - w) / 2, y, w, h)
                y += h + 2 * _GAP
            x += cw + max(90.0, lab_w.get(r, 0.0) + 40)
        width = x - max(90.0, lab_w.get(ranks[-1], 0.0) + 40) + margin
        height = title_h + total_h + margin
    else:
        y = title_h
        row_w = {r: sum(size[i][0] for i in items[r]) + 2 * _GAP * max(len(items[r]) - 1, 0) for r in ranks}
        total_w = max(row_w.values())
        for r in ranks:
            rh = max(size[i][1] for i in items[r])
            x = margin + (total_w - row_w[r]) / 2
            for i in items[r]:
                w, h = size[i]
                boxes[i] = _Box(x, y, w, h)
                x += w + 2 * _GAP
            y += rh + max(50.0, lab_w.get(r, 0.0))
        width = total_w + 2 * margin
        height = y - max(50.0, lab_w.get(ranks[-1], 0.0)) + margin
    # members inside their clusters
    for c in fc.clusters:
        cb = boxes[c.id]
        y = cb.y + _CL_TITLE + _PAD
        for m in members[c.id]:
            w, h = size[m.id]
            boxes[m.id] = _Box(cb.x + _PAD, y, cb.w - 2 * _PAD, h)  # members share the column width
            y += h + _GAP
    legend_h = len(fc.legend) * _LH + (8 if fc.legend else 0)
    width = max(width, _tw(title) + 2 * margin, max((_tw(s) for s in fc.legend), default=0) + 2 * margin)
    body = [_text(margin, 19, title, "start", bold=True, size=13)]
    for c in fc.clusters:
        b = boxes[c.id]
        body.append(f'<rect x="{_f(b.x)}" y="{_f(b.y)}" width="{_f(b.w)}" height="{_f(b.h)}" rx="8" '
                    f'fill="#f6f7fb" stroke="#99a" stroke-dasharray="4 3"/>')
        body.append(_text(b.cx, b.y + 16, c.title, bold=True))
    labels = []
    pairs: dict[frozenset, list[Edge]] = {}
    for e in fc.edges:
        if not e.hidden:
            pairs.setdefault(frozenset((e.src, e.dst)), []).append(e)
    for e in fc.edges:
        if e.hidden:
            continue
        same = pairs[frozenset((e.src, e.dst))]
        off = (same.index(e) - (len(same) - 1) / 2) * 26  # parallel edges between one pair bow apart
        a, b = boxes[e.src], boxes[e.dst]
        ra, rb = rank_of[e.src], rank_of[e.dst]
        if fc.direction == "LR":
            if ra <= rb:
                x1, y1, x2, y2 = a.x + a.w, a.cy, b.x, b.cy
            else:
                x1, y1, x2, y2 = a.x, a.cy, b.x + b.w, b.cy
            if ra == rb:
                x2 = b.x + b.w
            dx = (x2 - x1) / 2 if ra != rb else 40
            if ra > rb:  # back edge: leave left, arrive right
                dx = -40.0
            c1, c2 = (x1 + dx, y1 + 2 * off), (x2 - dx, y2 + 2 * off)
            d = (f"M{_f(x1)},{_f(y1)} C{_f(c1[0])},{_f(c1[1])} {_f(c2[0])},{_f(c2[1])} {_f(x2)},{_f(y2)}")
        else:
            if ra <= rb:
                x1, y1, x2, y2 = a.cx, a.y + a.h, b.cx, b.y
            else:
                x1, y1, x2, y2 = a.cx, a.y, b.cx, b.y + b.h
            dy = (y2 - y1) / 2
            c1, c2 = (x1 + 2 * off, y1 + dy), (x2 + 2 * off, y2 - dy)
            d = f"M{_f(x1)},{_f(y1)} C{_f(c1[0])},{_f(c1[1])} {_f(c2[0])},{_f(c2[1])} {_f(x2)},{_f(y2)}"
        marks = f' marker-end="{_marker(name)}"' + (f' marker-start="{_marker(name)}"' if e.both else "")
        dash = ' stroke-dasharray="5 4"' if e.dashed else ""
        body.append(f'<path d="{d}" fill="none" stroke="#667" stroke-width="1.2"{dash}{marks}>'
                    f"<title>{_x(e.src + ' -> ' + e.dst)}</title></path>")
        if e.label:
            # the curve's midpoint (t = 1/2 of the cubic)
            mx = (x1 + 3 * c1[0] + 3 * c2[0] + x2) / 8
            my = (y1 + 3 * c1[1] + 3 * c2[1] + y2) / 8
            w = _tw(e.label) + 6
            labels.append(f'<rect x="{_f(mx - w / 2)}" y="{_f(my - 9)}" width="{_f(w)}" height="16" rx="3" '
                          f'fill="#ffffff" fill-opacity="0.9"/>')
            labels.append(_text(mx, my + 3.5, e.label, size=11, fill="#445"))
    for n in fc.nodes:
        b = boxes[n.id]
        fill, stroke = _FILL.get(n.kind, _FILL["box"])
        body.append(f'<g class="pq-node" data-id="{_x(n.id)}"><rect x="{_f(b.x)}" y="{_f(b.y)}" width="{_f(b.w)}" '
                    f'height="{_f(b.h)}" rx="5" fill="{fill}" stroke="{stroke}"/>')
        for k, s in enumerate(n.lines):
            body.append(_text(b.cx, b.y + _PAD + 11 + k * _LH, s, bold=(k == 0)))
        body.append("</g>")
    body += labels
    for k, s in enumerate(fc.legend):
        body.append(_text(margin, height + 6 + k * _LH, s, "start", size=11, fill="#555"))
    return _svg_doc(name, title, width, height + legend_h, body)


# -- SVG: sequence ----------------------------------------------------------------------------

def sequence_svg(sq: Sequence, name: str, title: str) -> str:
    idx = {p: i for i, (p, _) in enumerate(sq.participants)}
    n = len(sq.participants)
    pw = [max(_tw(lab) + 2 * _PAD + 4, 90.0) for _, lab in sq.participants]
    gaps = [(pw[i] + pw[i + 1]) / 2 + 24 for i in range(n - 1)]
    msgs = [it for it in sq.items if isinstance(it, Message)]
    for m in sorted(msgs, key=lambda m: abs(idx[m.src] - idx[m.dst])):
        a, b = sorted((idx[m.src], idx[m.dst]))
        need = _tw(m.text) + 28
        if a == b:  # self message: label right of the lifeline
            if a < n - 1:
                gaps[a] = max(gaps[a], need + 20)
            continue
        have = sum(gaps[a:b])
        if have < need:
            extra = (need - have) / (b - a)
            for k in range(a, b):
                gaps[k] += extra
    xs = [0.0]
    for g in gaps:
        xs.append(xs[-1] + g)
    # horizontal extent, including notes centred over their participant and fragment margins
    lo = min(xs[i] - pw[i] / 2 for i in range(n))
    hi = max(xs[i] + pw[i] / 2 for i in range(n))
    for it in sq.items:
        if isinstance(it, Note):
            w = max(_tw(s) for s in it.lines) + 2 * _PAD
            lo, hi = min(lo, xs[idx[it.over]] - w / 2), max(hi, xs[idx[it.over]] + w / 2)
    margin = 24.0
    shift = margin - lo + 10
    xs = [x + shift for x in xs]
    width = max(hi + shift + margin + 10, _tw(title) + 2 * margin)
    top = 34.0
    ph = _LH + 2 * _PAD
    body: list[str] = [_text(margin, 20, title, "start", bold=True, size=13)]
    # rows
    starts: dict[int, list[tuple[Fragment, int]]] = {}
    for fr in sq.fragments:
        for bi, (_, s) in enumerate(fr.branches):
            starts.setdefault(s, []).append((fr, bi))
    frag_y: dict[int, dict[str, list[float]]] = {id(fr): {"branch": [], "end": []} for fr in sq.fragments}
    y = top + ph + 16
    rows: list[tuple[float, Message | Note]] = []
    for i, it in enumerate(sq.items + [None]):
        for fr in sq.fragments:
            if fr.end == i:
                y += 6
                frag_y[id(fr)]["end"].append(y)
                y += 14
        for fr, bi in starts.get(i, []):
            if bi == 0:
                y += 4
            frag_y[id(fr)]["branch"].append(y)
            y += 24
        if it is None:
            break
        if isinstance(it, Note):
            h = len(it.lines) * _LH + 2 * 5
            rows.append((y, it))
            y += h + 10
        else:
            rows.append((y, it))
            y += 34 if it.src != it.dst else 46
    bottom = y + 6
    height = bottom + ph + margin
    # lifelines and participant boxes (top and bottom)
    for i, (p, lab) in enumerate(sq.participants):
        x = xs[i]
        body.append(f'<line x1="{_f(x)}" y1="{_f(top + ph)}" x2="{_f(x)}" y2="{_f(bottom)}" stroke="#99a" '
                    f'stroke-dasharray="4 4"/>')
    # fragments (behind messages)
    for fr in sq.fragments:
        ys = frag_y[id(fr)]
        inside = [it for it in sq.items[fr.branches[0][1]:fr.end]]
        cols = [idx[p] for it in inside for p in ((it.src, it.dst) if isinstance(it, Message) else (it.over,))]
        x0 = min(xs[c] for c in cols) - 70
        x1 = max(xs[c] for c in cols) + 70
        for it in inside:
            if isinstance(it, Note):
                w = max(_tw(s) for s in it.lines) + 2 * _PAD
                x0, x1 = min(x0, xs[idx[it.over]] - w / 2 - 10), max(x1, xs[idx[it.over]] + w / 2 + 10)
        y0, y1 = ys["branch"][0], ys["end"][0]
        body.append(f'<rect x="{_f(x0)}" y="{_f(y0)}" width="{_f(x1 - x0)}" height="{_f(y1 - y0)}" '
                    f'fill="#f7f7ff" fill-opacity="0.6" stroke="#88a"/>')
        for bi, (lab, _) in enumerate(fr.branches):
            by = ys["branch"][bi]
            if bi == 0:
                tag = fr.kind
                tw = _tw(tag) + 12
                body.append(f'<path d="M{_f(x0)},{_f(by)} h{_f(tw)} v12 l-6,6 h{_f(-(tw - 6))} z" fill="#dde" '
                            f'stroke="#88a"/>')
                body.append(_text(x0 + 6, by + 13, tag, "start", bold=True, size=11))
                body.append(_text(x0 + tw + 8, by + 14, f"[{lab}]", "start", size=11, fill="#335"))
            else:
                body.append(f'<line x1="{_f(x0)}" y1="{_f(by)}" x2="{_f(x1)}" y2="{_f(by)}" stroke="#88a" '
                            f'stroke-dasharray="6 4"/>')
                body.append(_text(x0 + 8, by + 14, f"[else: {lab}]", "start", size=11, fill="#335"))
    for y, it in rows:
        if isinstance(it, Note):
            x = xs[idx[it.over]]
            w = max(_tw(s) for s in it.lines) + 2 * _PAD
            h = len(it.lines) * _LH + 10
            fill, stroke = _FILL["note"]
            body.append(f'<rect x="{_f(x - w / 2)}" y="{_f(y)}" width="{_f(w)}" height="{_f(h)}" fill="{fill}" '
                        f'stroke="{stroke}"/>')
            for k, s in enumerate(it.lines):
                body.append(_text(x, y + 5 + 12 + k * _LH, s, size=_FS))
            continue
        xa, xb = xs[idx[it.src]], xs[idx[it.dst]]
        dash = ' stroke-dasharray="5 4"' if it.reply else ""
        if it.src == it.dst:
            body.append(f'<path d="M{_f(xa)},{_f(y + 18)} h30 v16 h-28" fill="none" stroke="#556" '
                        f'stroke-width="1.2"{dash} marker-end="{_marker(name)}"/>')
            body.append(_text(xa + 36, y + 14, it.text, "start"))
            continue
        body.append(f'<line x1="{_f(xa)}" y1="{_f(y + 20)}" x2="{_f(xb + (-2 if xb > xa else 2))}" y2="{_f(y + 20)}" '
                    f'stroke="#556" stroke-width="1.2"{dash} marker-end="{_marker(name)}"/>')
        body.append(_text((xa + xb) / 2, y + 14, it.text))
    for i, (p, lab) in enumerate(sq.participants):
        x = xs[i]
        fill, stroke = _FILL["participant"]
        for by in (top, bottom):
            body.append(f'<rect x="{_f(x - pw[i] / 2)}" y="{_f(by)}" width="{_f(pw[i])}" height="{_f(ph)}" rx="4" '
                        f'fill="{fill}" stroke="{stroke}"/>')
            body.append(_text(x, by + _PAD + 11, lab, bold=True))
    return _svg_doc(name, title, width, height, body)


# -- the diagrams -----------------------------------------------------------------------------

_TITLES = {"technique-map": "Technique map: the registered methods by family",
           "pipeline": "The quantization pipeline",
           "integration": "Integration: polyquant's formats and the tools that read or write them"}


def technique_map() -> Diagram:
    fc = technique_map_model()
    t = _TITLES["technique-map"]
    return Diagram("technique-map", t, flowchart_mermaid(fc), flowchart_svg(fc, "technique-map", t))


def pipeline() -> Diagram:
    sq = pipeline_model()
    t = _TITLES["pipeline"]
    return Diagram("pipeline", t, sequence_mermaid(sq), sequence_svg(sq, "pipeline", t))


def integration_graph() -> Diagram:
    fc = integration_model()
    t = _TITLES["integration"]
    return Diagram("integration", t, flowchart_mermaid(fc), flowchart_svg(fc, "integration", t))


def all_diagrams() -> dict[str, Diagram]:
    """Every diagram, keyed by name (``technique-map``, ``pipeline``, ``integration``), built now
    from the current registries."""
    return {"technique-map": technique_map(), "pipeline": pipeline(), "integration": integration_graph()}
