"""Charts of a sweep: valid PNG and SVG files, the axis labels, legend entries (method and
setting), the Pareto front and the fp32 reference in the SVG text; charts without data are not
drawn, and say why."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from polyquant.report.charts import CHARTS, chart_points, pareto_front, render_chart, write_charts


def rec(name, method, setting, *, cfg=True, ppl=None, kl=None, bpw=None, wb=None, dec=None, qs=None,
        kernel=None, status="ok"):
    return {"name": name, "method": method, "setting": setting, "config": {"method": method} if cfg else None,
            "status": status, "kernel": kernel or {"cpu-int4": 4},
            "size": {"bits_per_weight": bpw} if bpw is not None else {},
            "metrics": {"ppl": ppl, "kl": kl, "weight_bytes": wb, "decode_tok_s": dec} if status == "ok" else None,
            "timings": {"quantize_s": qs, "eval_s": 1.0}, "error": None if status == "ok" else "ValueError: no"}


def result(with_kl=True):
    kl = (lambda v: v) if with_kl else (lambda v: None)
    return {"model": "tiny-model", "settings": {"seqlen": 16, "max_windows": 2, "threads": 1},
            "runs": [rec("fp32", "fp32", "unquantized", cfg=False, ppl=10.0, bpw=32.0, wb=4e6, dec=20.0,
                         kernel={"dense": 1}),
                     rec("rtn-w8", "rtn", "rtn w8 pc sym", ppl=10.1, kl=kl(0.01), bpw=8.25, wb=1.5e6, dec=25.0, qs=0.5,
                         kernel={"cpu-int8": 4}),
                     rec("rtn-w4", "rtn", "rtn w4 g64 sym", ppl=12.0, kl=kl(0.3), bpw=4.5, wb=1.0e6, dec=30.0, qs=0.4),
                     rec("hqq-w4", "hqq", "hqq w4 g64", ppl=11.0, kl=kl(0.2), bpw=4.5, wb=1.0e6, dec=29.0, qs=3.0),
                     rec("nf4", "bnb-nf4", "bnb nf4 b64", ppl=11.5, kl=kl(0.25), bpw=4.13, wb=0.9e6, dec=2.0, qs=0.3,
                         kernel={"reference": 4}),
                     rec("w3", "rtn", "rtn w3 g64 sym", ppl=40.0, kl=kl(1.5), bpw=3.5, wb=0.8e6, dec=1.0, qs=0.3,
                         kernel={"reference": 4}),
                     rec("broken", "gptq", "gptq w4 g64", status="failed")]}


def test_pareto_front():
    pts = [(4.5, 12.0), (4.5, 11.0), (3.5, 40.0), (8.25, 10.1), (4.13, 11.5), (9.0, 10.5)]
    assert pareto_front(pts) == [2, 4, 1, 3]  # increasing size, each better than every smaller one
    assert pareto_front([]) == []


def test_points_leave_failed_runs_out_and_mark_slow_kernels():
    pts = {p.name: p for p in chart_points(result())}
    assert "broken" not in pts and pts["fp32"].baseline
    assert pts["nf4"].slow_kernel and not pts["rtn-w4"].slow_kernel
    assert pts["rtn-w4"].label == "rtn w4 g64 sym" and pts["nf4"].label == "bnb-nf4: bnb nf4 b64"
    assert pts["rtn-w8"].weight_mb == 1.5 and pts["fp32"].quantize_s is None


def _svg_text(path: Path) -> str:
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag.endswith("svg")
    return " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())


def test_files_are_valid_png_and_svg_with_labels(tmp_path):
    from matplotlib.image import imread
    out = write_charts(result(), tmp_path / "charts")
    assert set(out) == set(CHARTS)
    for name, info in out.items():
        png, svg = Path(info["png"]), Path(info["svg"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05  # not blank
        assert svg.name == f"{name}.svg" and png.name == f"{name}.png"
    ppl = _svg_text(Path(out["ppl_vs_bits"]["svg"]))
    for label in ("effective bits per weight", "perplexity", "Pareto front", "fp32 reference (ppl 10.000",
                  "rtn w4 g64 sym", "hqq w4 g64", "bnb-nf4: bnb nf4 b64", CHARTS["ppl_vs_bits"], "tiny-model"):
        assert label in ppl, label
    assert "gptq" not in ppl  # the failed run is not a point
    kl = _svg_text(Path(out["kl_vs_bits"]["svg"]))
    assert "KL divergence to fp32 (nats per token" in kl and "Pareto front" in kl
    speed = _svg_text(Path(out["speed_vs_memory"]["svg"]))
    for label in ("weight memory (MB", "decode speed (tokens/s, batch 1, 1 thread", "fp32 (unquantized)",
                  "fp32 reference (20.0 tokens/s", "bnb-nf4: bnb nf4 b64 [not a fast kernel]"):
        assert label in speed, label
    qt = _svg_text(Path(out["quantize_time"]["svg"]))
    assert "quantization time (seconds" in qt and "hqq w4 g64" in qt and "3 s" in qt and "fp32" not in qt


def test_chart_without_data_is_not_drawn(tmp_path):
    out = write_charts(result(with_kl=False), tmp_path)
    assert "svg" not in out["kl_vs_bits"] and "no finished run" in out["kl_vs_bits"]["missing"]
    assert not (tmp_path / "kl_vs_bits.svg").exists() and (tmp_path / "ppl_vs_bits.svg").is_file()
    empty = write_charts({"runs": []}, tmp_path / "empty")
    assert all("missing" in v for v in empty.values()) and not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="chart must be one of"):
        render_chart("pie", result())
