"""The hardware compatibility matrix: generated from the registries (a method registered in a test
appears, and leaves), the kernels' answers per device class, the probed matrix from sweep records,
and the Markdown / JSON / HTML renderings."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from helpers import AUTO_INT4, HAVE_LUT4
from report_dummies import DUMMY, dummy_method, raising_kernel

from polyquant.kernels import KERNELS
from polyquant.methods import METHODS, RTNConfig
from polyquant.report.matrix import (DEVICE_CLASSES, declared_matrix, device_class, matrix_html, matrix_json,
                                     matrix_markdown, probed_matrix)


@pytest.fixture(scope="module")
def declared():
    return declared_matrix()


def _row(rows, method, bits):
    (r,) = [r for r in rows if r["method"] == method and r["bits"] == bits]
    return r


def test_one_row_per_registered_method_and_bit_width(declared):
    assert {r["method"] for r in declared} == set(METHODS)
    for name, spec in METHODS.items():
        bits = sorted(r["bits"] for r in declared if r["method"] == name)
        if "bits" in spec.config_cls.__dataclass_fields__:
            assert bits == sorted(spec.bits), name
        else:
            assert len(bits) == 1, name
    assert all(set(r["devices"]) == {d.key for d in DEVICE_CLASSES} for r in declared if not r["error"])


def test_representative_settings(declared):
    assert _row(declared, "rtn", 8)["setting"] == "rtn w8 pc sym"
    assert _row(declared, "rtn", 4)["setting"] == "rtn w4 g64 sym"
    assert _row(declared, "rtn", 3)["config"]["group_size"] == 64
    assert _row(declared, "torchao-int4", 4)["config"]["group_size"] == 64  # no bits field: by its widths


def test_cells_follow_the_kernels(declared):
    w4, w5 = _row(declared, "rtn", 4)["devices"], _row(declared, "rtn", 5)["devices"]
    assert "cpu-int4" in w4["cpu"]["fast"] and w4["cpu"]["reference"] and w4["cpu"]["quantize"]
    assert w4["cpu"]["kernel"] == AUTO_INT4
    assert _row(declared, "rtn", 3)["devices"]["cpu"]["kernel"] == AUTO_INT4  # 3-bit codes ride a 4-bit kernel
    assert w5["cpu"]["fast"] == [] and w5["cpu"]["reference"] and w5["cpu"]["kernel"] == "reference"
    assert "cpu-int4" in w5["cpu"]["declined"]  # with the kernel's reason
    assert "4-bit" in w5["cpu"]["declined"]["cpu-int4"]
    nf4 = _row(declared, "bnb-nf4", 4)["devices"]["cpu"]
    if HAVE_LUT4:  # the compiled code-book kernel
        assert nf4["fast"] == ["cpu-lut4"] and nf4["kernel"] == "cpu-lut4"
    else:
        assert nf4["fast"] == [] and "cpu-lut4" in nf4["declined"]  # with the reason (no compiler, disabled)
    assert "nf4" in nf4["declined"]["cpu-int4"]
    # CUDA: the Triton kernel with its minimum compute capability
    cap = KERNELS["triton-w4a16"].min_capability
    assert "triton-w4a16" in w4["cuda"]["fast"] and w4["cuda"]["min_capability"]["triton-w4a16"] == f"{cap[0]}.{cap[1]}"
    # ROCm / MPS / XPU: only the reference kernel is declared there
    for dev in ("rocm", "mps", "xpu"):
        assert w4[dev]["fast"] == [] and w4[dev]["reference"], dev
    fp8 = _row(declared, "fp8", 8)["devices"]
    assert fp8["cpu"]["fast"] == [] and fp8["cpu"]["slow"] == ["fp8-emulated"]
    cap = KERNELS["fp8-scaled-mm"].min_capability
    assert fp8["cuda"]["min_capability"]["fp8-scaled-mm"] == f"{cap[0]}.{cap[1]}"
    assert not fp8["mps"]["quantize"] and not fp8["mps"]["reference"] and "float8" in fp8["mps"]["quantize_note"]
    # an activation-rule kernel only for the setting with that rule
    assert "int8-dynamic" in _row(declared, "torchao-int8-dynamic", 8)["devices"]["cpu"]["fast"]
    assert "int8-dynamic" not in _row(declared, "rtn", 8)["devices"]["cpu"]["fast"]


def test_capability_is_held_against_the_kernels_minimum():
    from polyquant.report.matrix import device_cell, sample_layer
    from polyquant.methods.fp8 import Fp8Config
    qw, act = sample_layer(Fp8Config())
    assert "fp8-scaled-mm" in device_cell(qw, act, "cuda", capability=(9, 0))["fast"]
    low = device_cell(qw, act, "cuda", capability=(8, 0))
    assert "fp8-scaled-mm" not in low["fast"] and "8.9" in low["declined"]["fp8-scaled-mm"]


def test_a_registered_method_appears_and_leaves():
    with dummy_method() as name:
        rows = declared_matrix()
        mine = [r for r in rows if r["method"] == name]
        assert [r["bits"] for r in mine] == [2, 3] and mine[0]["setting"] == "dummy w2 g64"
        assert mine[0]["devices"]["cpu"]["reference"]
        assert f"`{name}`" in matrix_markdown(rows)
        assert f'data-method="{name}"' in matrix_html(rows)
    assert DUMMY not in {r["method"] for r in declared_matrix()}


def test_a_method_that_raises_is_a_row_with_the_error():
    with dummy_method("dummy-broken", broken=True) as name:
        rows = declared_matrix([name])
    assert len(rows) == 2 and all("dummy quantizer exploded" in r["error"] for r in rows)
    assert rows[0]["devices"] == {}
    assert "error: quantizing" in matrix_markdown(rows)


def test_a_kernel_whose_supports_raises_is_recorded_not_fatal():
    with raising_kernel() as kname:
        rows = declared_matrix(["rtn"])
    cell = _row(rows, "rtn", 4)["devices"]["cpu"]
    assert "supports() raised RuntimeError: supports blew up" in cell["declined"][kname]
    assert cell["kernel"] == AUTO_INT4


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        declared_matrix(["no-such-method"])
    with pytest.raises(ValueError, match="device"):
        device_class("tpu")
    assert device_class("cuda:1").key == "cuda" and device_class("hip").key == "rocm"


# -- probed ------------------------------------------------------------------------------------

def _rec(name, config, status="ok", kernel=None, error=None, device="cpu", ppl=None, wb=None):
    r = {"name": name, "method": config.method if config else "fp32",
         "setting": config.describe() if config else "unquantized",
         "config": config.to_dict() if config else None, "device": device, "status": status,
         "model": "tiny", "settings": {"seqlen": 16}}
    if kernel is not None:
        r["kernel"] = kernel
    if error is not None:
        r["error"] = error
    r["metrics"] = {"ppl": ppl, "weight_bytes": wb}
    return r


def test_probed_matrix_from_records():
    recs = [_rec("fp32", None, kernel={"dense": 1}),
            _rec("w4", RTNConfig(bits=4, group_size=64), kernel={AUTO_INT4: 14}),
            _rec("w4-ref", RTNConfig(bits=4, group_size=64, sym=False), kernel={"reference": 14}),
            _rec("w3", RTNConfig(bits=3, group_size=64), status="failed", error="RuntimeError: boom")]
    rows = probed_matrix({"runs": recs})
    assert [r["name"] for r in rows] == ["w4", "w4-ref", "w3"]  # the baseline is not a method
    w4, ref, w3 = rows
    assert w4["kernels"] == {AUTO_INT4: 14} and w4["fast"] is True and w4["as_declared"] is True
    assert ref["fast"] is False and ref["as_declared"] is False and ref["declared_kernel"] == AUTO_INT4
    assert "layer shapes" in ref["note"] and ref["reference_layers"] == 14
    assert w3["status"] == "failed" and w3["error"] == "RuntimeError: boom" and w3["kernels"] == {}
    md = matrix_markdown(rows)
    assert "failed: RuntimeError: boom" in md and f"{AUTO_INT4}×14" in md
    html = matrix_html(declared_matrix(["rtn"]), rows)
    assert 'class="pq-matrix-probed"' in html and html.count('<tr data-method="rtn">') == 6 + 3


def test_probed_matrix_validates_its_input():
    with pytest.raises(ValueError, match="runs"):
        probed_matrix({"nothing": []})
    with pytest.raises(ValueError, match=r"records\[0\]"):
        probed_matrix(["not a record"])
    with pytest.raises(ValueError, match="declared must be"):
        matrix_html(probed_matrix([_rec("w4", RTNConfig(bits=4, group_size=64), kernel={"cpu-int4": 1})]))


# -- renderings --------------------------------------------------------------------------------

def test_json_round_trips(declared):
    assert json.loads(matrix_json(declared)) == declared


def test_markdown_has_one_line_per_row(declared):
    md = matrix_markdown(declared)
    body = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert len(body) == len(declared)
    head = next(ln for ln in md.splitlines() if ln.startswith("| method"))
    assert all(d.label in head for d in DEVICE_CLASSES)
    w4 = next(ln for ln in body if re.match(r"\| `rtn` \| 4 \|", ln))
    cap = KERNELS["triton-w4a16"].min_capability
    assert "cpu-int4" in w4 and f"triton-w4a16 (cc ≥ {cap[0]}.{cap[1]})" in w4


class _Checker(HTMLParser):
    VOID = {"br", "img", "hr", "meta", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def test_html_fragment_is_balanced_and_self_contained(declared):
    frag = matrix_html(declared)
    p = _Checker()
    p.feed(frag)
    p.close()
    assert p.stack == []
    assert p.tags[0] == "section" and "script" not in p.tags and "link" not in p.tags
    assert "src" not in p.attrs and "href" not in p.attrs and "url(" not in frag
    assert frag.count("<tr data-method=") == len(declared)
