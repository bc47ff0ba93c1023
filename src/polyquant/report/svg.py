"""Self-contained SVG of a diagram model (:mod:`polyquant.report.diagram_model`), laid out here:
layered boxes, labels sized to fit in a monospace font, curved arrows; no mermaid.js, no fonts,
scripts or anything fetched; text escaped for XML."""
from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape as _xml_escape

from polyquant.report.diagram_model import Edge, Flowchart, Fragment, Message, Node, Note, Sequence, _slug, _unique_ids

__all__ = ["flowchart_svg", "sequence_svg"]


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
    # one layout for both directions: ranks follow each other along the main axis (x for LR, y for
    # TB), a rank's items along the cross axis with the rank centred there; LR also centres each
    # item in its column, TB keeps a row's items top-aligned
    lr = fc.direction == "LR"
    main, cross = (0, 1) if lr else (1, 0)  # indices into a (w, h) size

    def rank_gap(r: int) -> float:
        return max(90.0, lab_w.get(r, 0.0) + 40) if lr else max(50.0, lab_w.get(r, 0.0))

    span = {r: sum(size[i][cross] for i in items[r]) + 2 * _GAP * max(len(items[r]) - 1, 0) for r in ranks}
    total = max(span.values())
    at, cross0 = (margin, title_h) if lr else (title_h, margin)
    for r in ranks:
        thick = max(size[i][main] for i in items[r])
        pos = cross0 + (total - span[r]) / 2
        for i in items[r]:
            w, h = size[i]
            boxes[i] = _Box(at + (thick - w) / 2, pos, w, h) if lr else _Box(pos, at, w, h)
            pos += size[i][cross] + 2 * _GAP
        at += thick + rank_gap(r)
    extent = at - rank_gap(ranks[-1]) + margin
    width, height = (extent, cross0 + total + margin) if lr else (cross0 + total + margin, extent)
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
