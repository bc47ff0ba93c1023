"""The overview's diagrams: generated from the registries (exactly the registered methods and
formats, a method registered in a test appears in the Mermaid and the SVG), well-formed SVG with
every label and boxes that fit them, escaping, and nothing fetched."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from report_dummies import DUMMY, dummy_method

import polyquant.formats as formats
from polyquant.kernels import KERNELS
from polyquant.methods import METHODS
from polyquant.methods.registry import FAMILIES
from polyquant.report.diagrams import DIAGRAM_NAMES, Diagram, all_diagrams, format_tools, tool_name

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def diagrams() -> dict[str, Diagram]:
    return all_diagrams()


def texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_all_diagrams(diagrams):
    assert list(diagrams) == list(DIAGRAM_NAMES) == ["technique-map", "pipeline", "integration"]
    assert diagrams["technique-map"].mermaid.startswith("flowchart TB\n")
    assert diagrams["pipeline"].mermaid.startswith("sequenceDiagram\n")
    assert diagrams["integration"].mermaid.startswith("flowchart LR\n")
    for d in diagrams.values():
        root = ET.fromstring(d.svg)  # well-formed XML
        assert root.tag == f"{SVG}svg"
        assert root.find(f"{SVG}title").text == d.title
        assert float(root.get("width")) > 100 and float(root.get("height")) > 100


def _method_nodes(mermaid: str) -> list[str]:
    return re.findall(r"^\s+m_(\w+)\[", mermaid, re.M)


def test_technique_map_has_one_node_per_method_grouped_by_family(diagrams):
    d = diagrams["technique-map"]
    assert sorted(_method_nodes(d.mermaid)) == sorted(re.sub(r"\W", "_", m) for m in METHODS)
    ts = texts(d.svg)
    for name, spec in METHODS.items():
        assert ts.count(name) == 1, name  # the node's title line, once
        assert f"bits {','.join(map(str, spec.bits))}" in ts
    used = {s.family for s in METHODS.values()}
    for fam in FAMILIES:
        in_svg = any(t.startswith(f"{fam} (") for t in ts)
        assert in_svg == (fam in used), fam
    # a method sits inside its family's subgraph
    block = re.search(r'subgraph fam_float8\[.*?\n(.*?)\n    end', d.mermaid, re.S).group(1)
    assert "m_fp8_block[" in block and "m_rtn[" not in block


def test_integration_graph_has_every_format_and_its_tools(diagrams):
    d = diagrams["integration"]
    fmts = formats.list_formats()
    nodes = re.findall(r'^\s+f_(\w+)\["([^<"]+)<br/>', d.mermaid, re.M)
    assert sorted(n for _, n in nodes) == sorted(f.name for f in fmts)
    ts = texts(d.svg)
    for f in fmts:
        assert f.name in ts
    # edges: a reader gets format -> tool, a writer-only tool -> format, both <->; solid when
    # tests/interop verified it here, dashed when the format only names the tool (untested_*)
    assert re.search(r"^\s+f_compressed_tensors <--> t_compressed_tensors$", d.mermaid, re.M)  # verified both
    assert re.search(r"^\s+f_compressed_tensors --> t_transformers$", d.mermaid, re.M)         # verified read
    assert re.search(r"^\s+f_compressed_tensors -.-> t_vllm$", d.mermaid, re.M)                # named, unverified
    assert re.search(r"^\s+f_gptq <-.-> t_gptqmodel$", d.mermaid, re.M)                        # both, unverified
    assert re.search(r"^\s+t_llm_compressor -.-> f_gptq$", d.mermaid, re.M)                    # writes only
    for label in ("vLLM", "transformers", "GPTQModel", "llama.cpp", "AutoAWQ", "optimum-quanto"):
        assert any(label in t for t in ts), label


def test_every_format_declares_readers_and_writers():
    """The integration graph's data lives on each format class; a new format must fill it: the
    tools tests/interop verified (readers / writers) or, with the reason, the others (untested_*)."""
    for f in formats.list_formats():
        assert f.readers or f.untested_readers, f.name
        assert all(isinstance(v, str) and v for v in {**f.untested_readers, **f.untested_writers}.values()), f.name
        assert not set(f.readers) & set(f.untested_readers), f.name
        assert format_tools(f), f.name


def test_tool_names_are_canonical():
    assert tool_name("transformers (< 5: HqqConfig)") == [("transformers", "< 5: HqqConfig")]
    assert tool_name("transformers + bitsandbytes") == [("transformers", ""), ("bitsandbytes", "")]
    assert tool_name("llmcompressor (awq export)") == [("llm-compressor", "awq export")]
    assert tool_name("llm-compressor") == [("llm-compressor", "")]
    with pytest.raises(ValueError, match="reader/writer"):
        tool_name(" ")


def test_pipeline_names_the_registries(diagrams):
    d = diagrams["pipeline"]
    calib = sorted(n for n, s in METHODS.items() if s.needs_calibration)
    assert f"alt needs calibration data ({len(calib)} methods)" in d.mermaid
    assert re.search(r"^\s+else no data", d.mermaid, re.M) and d.mermaid.rstrip().splitlines()[-1].strip() != "end"
    joined = " ".join(texts(d.svg))
    for name in list(METHODS) + [f.name for f in formats.list_formats()] + list(KERNELS):
        assert re.search(rf"(^|[ ,]){re.escape(name)}(,|$| )", joined), name
    for step in ("load: default", "configure:", "calibrate:", "quantize_model(model, config)",
                 "save(model, DIR, format)", "load(DIR): format from config.json",
                 "evaluate(): ppl, KL, top-1, bytes, tok/s"):
        assert step in d.mermaid.replace("#124;", "|").replace("#62;", ">") and any(step in t for t in texts(d.svg))


def test_a_registered_method_appears_in_mermaid_and_svg_then_leaves():
    with dummy_method() as name:
        ds = all_diagrams()
        tm = ds["technique-map"]
        assert "m_dummy_ternaryish[" in tm.mermaid and name in texts(tm.svg)
        n = sum(1 for s in METHODS.values() if s.family == "ternary")  # the dummy included
        assert f"ternary ({n})" in texts(tm.svg)
        assert name in ds["pipeline"].mermaid and any(name in t for t in texts(ds["pipeline"].svg))
        assert len(_method_nodes(tm.mermaid)) == len(METHODS)
    tm = all_diagrams()["technique-map"]
    assert DUMMY not in tm.mermaid and DUMMY not in tm.svg


def test_labels_are_escaped_for_both_targets():
    nasty = 'int8 <dyn> & "quoted"; #1 | {x} [y]'
    with dummy_method("dummy-nasty", activations=nasty, family="codebook"):
        d = all_diagrams()["technique-map"]
    ts = texts(d.svg)  # parses: the SVG escaped it
    assert "act: int8 <dyn> & \"quoted\"; #1 |" in ts
    line = next(ln for ln in d.mermaid.splitlines() if "m_dummy_nasty[" in ln)
    inner = line[line.index('["') + 2:line.rindex('"]')].replace("<br/>", "")
    assert not set(re.sub(r"#\d+;", "", inner)) & set('"<>;|{}[]#'), inner  # only entity codes remain
    assert "#60;dyn#62; #38; #34;quoted#34;#59;" in inner


def test_boxes_fit_their_labels(diagrams):
    """Every node box is wider than its longest line at a monospace advance of 0.6 em."""
    for d in diagrams.values():
        root = ET.fromstring(d.svg)
        fs = float(root.get("font-size"))
        groups = [g for g in root.iter(f"{SVG}g") if g.get("class") == "pq-node"]
        assert groups or d.name == "pipeline"
        for g in groups:
            rect = g.find(f"{SVG}rect")
            lines = [t.text for t in g.findall(f"{SVG}text")]
            need = max(len(s) for s in lines) * 0.6 * fs
            assert float(rect.get("width")) >= need + 8, (d.name, lines[0])
            assert float(rect.get("height")) >= len(lines) * fs * 1.2, (d.name, lines[0])
            x = float(rect.get("x"))
            assert x >= 0 and x + float(rect.get("width")) <= float(root.get("width")), (d.name, lines[0])


def test_svgs_are_self_contained_and_ids_do_not_collide(diagrams):
    ids = []
    for d in diagrams.values():
        assert "<script" not in d.svg and "href" not in d.svg and "@import" not in d.svg
        assert re.findall(r"https?://[^\s\"]*", d.svg) == ["http://www.w3.org/2000/svg"]
        ids += re.findall(r'\bid="([^"]+)"', d.svg)
    assert len(ids) == len(set(ids))  # several inline SVGs can share one HTML page
