"""The small models the overview's diagrams are built as (:mod:`polyquant.report.diagrams`): nodes,
clusters and edges of a flowchart; participants, messages, notes and alt-fragments of a sequence.
Both renderings (:mod:`polyquant.report.mermaid`, :mod:`polyquant.report.svg`) read only these."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["Node", "Edge", "Cluster", "Flowchart", "Message", "Note", "Fragment", "Sequence"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", s)


def _unique_ids(ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"diagram id {i!r} is used twice (two registry names map to the same id)")
        seen.add(i)


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
