"""Export targets in the compatibility matrix and the integration graph: generated from
``polyquant.export.EXPORTERS`` (each target's own ``check_layer`` / ``layer_type`` / readers)."""
from __future__ import annotations

import pytest

from polyquant.export import EXPORTERS, Exporter, list_exporters, register_exporter
from polyquant.report import matrix as mx
from polyquant.report.diagrams import integration_model


@pytest.fixture(scope="module")
def rows():
    return mx.declared_matrix(["rtn", "hqq", "gptq"])


def _row(rows, method, bits):
    return next(r for r in rows if r["method"] == method and r["bits"] == bits)


def test_every_row_has_a_cell_per_registered_target(rows):
    names = set(list_exporters())
    assert {"gguf", "onnx"} <= names
    for r in rows:
        if not r["error"]:
            assert set(r["exports"]) == names, r["setting"]


def test_cells_follow_the_targets_own_checks(rows):
    from polyquant.report.matrix import sample_layer
    for r in rows:
        if r["error"]:
            continue
        from polyquant.methods import config_from_dict
        qw, _ = sample_layer(config_from_dict(dict(r["config"])))
        for name, cell in r["exports"].items():
            why = EXPORTERS[name].check_layer(qw)
            assert cell["exact"] is (why is None) and cell["reason"] == why, (r["setting"], name)
    # known answers: symmetric int4 g64 -> Q4_0 and MatMulNBits4; int8 per channel -> Q8_0 / MatMulNBits8
    w4 = _row(rows, "rtn", 4)["exports"]
    assert (w4["gguf"]["type"], w4["onnx"]["type"]) == ("Q4_0", "MatMulNBits4")
    w8 = _row(rows, "rtn", 8)["exports"]
    assert (w8["gguf"]["type"], w8["onnx"]["type"]) == ("Q8_0", "MatMulNBits8")
    # HQQ's float zero points: Q4_1 holds them (up to fp16), MatMulNBits' uint8 zero points cannot
    h4 = _row(rows, "hqq", 4)["exports"]
    assert h4["gguf"]["exact"] and h4["gguf"]["type"] == "Q4_1"
    assert not h4["onnx"]["exact"] and "zero points" in h4["onnx"]["reason"] and h4["onnx"]["type"] is None
    # 3-bit: Q4_0 holds symmetric 3-bit codes; onnxruntime's CPU kernel has no 3-bit path
    r3 = _row(rows, "rtn", 3)["exports"]
    assert r3["gguf"]["type"] == "Q4_0" and "3-bit" in r3["onnx"]["reason"]


def test_readers_and_untested_readers(rows):
    cell = _row(rows, "rtn", 4)["exports"]
    assert cell["onnx"]["readers"] == ["onnxruntime"]
    assert "llama.cpp" in cell["gguf"]["readers"]
    why = cell["onnx"]["untested_readers"]["optimum-onnx"]
    assert "transformers 5" in why and "transformers<4.58" in why


def test_markdown_and_html_columns(rows):
    md = mx.matrix_markdown(rows)
    head = md.splitlines()[2]
    assert "export gguf → llama.cpp, transformers (gguf_file=)" in head and "export onnx → onnxruntime" in head
    n_cols = head.count("|") - 1
    body = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert body and all(ln.count("|") - ln.count("\\|") - 1 == n_cols for ln in body)
    line = next(ln for ln in body if ln.startswith("| `rtn` | 4 |"))
    assert line.rstrip(" |").endswith("✓ Q4_0 | ✓ MatMulNBits4")
    assert "optimum-onnx (reads onnx): not verified here: does not load with transformers 5" in md
    frag = mx.matrix_html(rows)
    assert frag.count("<th>export ") == 2 and "MatMulNBits4" in frag and "optimum-onnx" in frag


def test_a_registered_target_becomes_a_column_and_leaves():
    def check(qw):
        return None if qw.bits == 4 else f"{qw.bits}-bit: only 4-bit here"
    x = register_exporter(Exporter(name="zz-dummy", suffix=".zz", readers=("zz-runtime",), run=lambda *a, **k: None,
                                   description="test", check_layer=check, layer_type=lambda qw: "ZZ4"))
    try:
        rows = mx.declared_matrix(["rtn"])
        assert _row(rows, "rtn", 4)["exports"]["zz-dummy"]["type"] == "ZZ4"
        assert _row(rows, "rtn", 8)["exports"]["zz-dummy"]["reason"] == "8-bit: only 4-bit here"
        assert "export zz-dummy → zz-runtime" in mx.matrix_markdown(rows)
        assert any(e.src == "x_zz_dummy" for e in integration_model().edges)
    finally:
        EXPORTERS.pop(x.name)
    assert "zz-dummy" not in mx.declared_matrix(["rtn"])[0]["exports"]


def test_a_target_whose_check_raises_is_recorded_not_fatal():
    def boom(qw):
        raise RuntimeError("exploded")
    cell = mx.export_cell(object(), Exporter(name="b", suffix=".b", readers=(), run=lambda: None, description="",
                                             check_layer=boom))
    assert not cell["exact"] and "RuntimeError: exploded" in cell["reason"]


def test_integration_graph_draws_export_readers():
    fc = integration_model()
    edges = {(e.src, e.dst): e for e in fc.edges}
    assert not edges[("x_onnx", "t_onnxruntime")].dashed
    assert not edges[("x_gguf", "t_llama_cpp")].dashed
    opt = edges[("x_onnx", "t_optimum_onnx")]
    assert opt.dashed and opt.label == "does not load with transformers 5"
    labels = {n.id: n.lines for n in fc.nodes}
    assert labels["t_onnxruntime"] == ["ONNX Runtime"]
