"""The overview's diagrams, generated from the registries so they never go stale.

This module owns the three diagrams (their models, read from the registries); the models'
classes are :mod:`polyquant.report.diagram_model`, the renderings :mod:`polyquant.report.mermaid`
and :mod:`polyquant.report.svg`:

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
from dataclasses import dataclass

from polyquant.report.diagram_model import (Cluster, Edge, Flowchart, Fragment, Message, Node, Note,  # noqa: F401
                                            Sequence, _slug)
from polyquant.report.mermaid import flowchart_mermaid, sequence_mermaid
from polyquant.report.svg import flowchart_svg, sequence_svg

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


# -- registry data ----------------------------------------------------------------------------

_TOOL_ALIASES = {"llmcompressor": "llm-compressor", "autoawq": "autoawq", "auto-gptq": "autogptq",
                 "quanto": "optimum-quanto", "vllm": "vllm"}
_TOOL_LABELS = {"transformers": "transformers", "vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI",
                "autoawq": "AutoAWQ", "llm-awq": "llm-awq", "gptqmodel": "GPTQModel", "autogptq": "AutoGPTQ",
                "optimum": "optimum", "exllamav2": "ExLlamaV2", "bitsandbytes": "bitsandbytes", "peft": "PEFT",
                "hqq": "hqq", "optimum-quanto": "optimum-quanto", "torchao": "torchao",
                "compressed-tensors": "compressed-tensors", "llm-compressor": "llm-compressor", "eetq": "EETQ",
                "deepseek": "DeepSeek-V3 inference", "llama.cpp": "llama.cpp", "fbgemm": "FBGEMM",
                "onnxruntime": "ONNX Runtime", "optimum-onnx": "optimum-onnx"}


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
    """``tool -> {"reads": bool, "writes": bool, "note": str, "verified": bool}`` for one format
    object: the tools ``tests/interop`` verified (``readers`` / ``writers``) and, unverified, the
    others the format names (``untested_readers`` / ``untested_writers``, with why)."""
    tools: dict[str, dict[str, object]] = {}
    for attr, flag, verified in (("readers", "reads", True), ("writers", "writes", True),
                                 ("untested_readers", "reads", False), ("untested_writers", "writes", False)):
        for entry in getattr(fmt, attr, ()) or ():
            for tool, qual in tool_name(entry):
                t = tools.setdefault(tool, {"reads": False, "writes": False, "note": "", "verified": verified})
                if t[flag] and not verified:
                    continue  # already verified in this direction
                t[flag] = True
                t["verified"] = bool(t["verified"]) and verified  # solid only if every direction is
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
            dashed = not info["verified"]  # named by the format, not verified by tests/interop
            if info["reads"]:
                tool_edges.append(Edge(fid, tid, str(info["note"]), both=bool(info["writes"]), dashed=dashed))
            else:
                tool_edges.append(Edge(tid, fid, str(info["note"]), dashed=dashed))
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
        for entry, why in (getattr(x, "untested_readers", None) or {}).items():  # named, not run here
            for tool, qual in tool_name(entry):
                label = qual or (str(why).split(":", 1)[0] if why else "not verified")
                tool_edges.append(Edge(xid, tools.setdefault(tool, "t_" + _slug(tool)), label, dashed=True))
    for tool, tid in sorted(tools.items(), key=lambda kv: _tool_label(kv[0]).lower()):
        nodes.append(Node(tid, [_tool_label(tool)], "tool", 3))
    legend = ["format -> tool: the tool reads it", "tool -> format: the tool writes it",
              "<-> both; the label qualifies",
              "solid: verified by tests/interop here; dashed: not verified here (docs/interop.md says why)"]
    return Flowchart("LR", nodes, edges + tool_edges, clusters, legend)


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
