"""The HTML report of a tiny sweep: one self-contained file (no external URL, nothing fetched),
with the results table, the charts, the compatibility matrices and the diagrams; rendered in
headless Chromium, where the table, every chart and every diagram must be present and visible,
the table must sort, and the screenshot must not be blank.

The Chromium test skips only when no ``chromium`` is installed and ``POLYQUANT_REQUIRE_CHROMIUM``
is unset (``./setup.sh --test`` installs Debian's package; CI sets the variable, so a missing
browser fails there).
"""
from __future__ import annotations

import html as htmllib
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import tiny_llama, tiny_tokenizer_dir

from polyquant.methods import RTNConfig
from polyquant.methods.gptq import GPTQConfig
from polyquant.report.charts import CHARTS
from polyquant.report.compare import Run, run_compare
from polyquant.report.html import inline_svg, write_report

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny sweep (fp32, two RTN settings, GPTQ with calibration, and a run that fails) and its report."""
    root = tmp_path_factory.mktemp("html")
    model = root / "tiny-llama"
    tiny_llama(seed=3).save_pretrained(str(model), safe_serialization=True)
    tiny_tokenizer_dir(model)
    rng = random.Random(2)
    text = " ".join(f"w{rng.randrange(250)}" for _ in range(1200))
    runs = [Run("fp32"), Run("rtn-w8", RTNConfig(bits=8, group_size=-1)), Run("rtn-w4", RTNConfig(bits=4, group_size=32)),
            Run("gptq-w4", GPTQConfig(bits=4, group_size=32)), Run("broken", RTNConfig(include=["^nothing$"]))]
    out = root / "report"
    result = run_compare(model, out, runs, text=text, calib_text=text, calib_samples=4, calib_seqlen=16, seqlen=16,
                         max_windows=2, decode_tokens=4, skipped=[{"method": "quanto", "setting": "bits=3",
                                                                   "reason": "quanto supports bits 2, 4, 8 only"}],
                         show_progress=False)
    paths = write_report(out, result)
    assert paths[-1] == out / "report.html"
    return out, result


def test_report_files(report):
    out, result = report
    for name in CHARTS:
        assert (out / "charts" / f"{name}.png").is_file() and (out / "charts" / f"{name}.svg").is_file(), name
    md = (out / "matrix.md").read_text()
    assert "## Declared" in md and "## Probed" in md and "rtn" in md
    mj = json.loads((out / "matrix.json").read_text())
    assert set(mj) == {"declared", "probed"} and mj["declared"] and mj["probed"]
    summary = (out / "summary.md").read_text()
    assert "5 runs (1 failed)" in summary and "quanto bits=3" in summary


def test_page_is_self_contained_and_has_every_part(report):
    out, result = report
    page = (out / "report.html").read_text()
    # nothing to fetch: no URL anywhere, no src/href that leaves the page, no external script or style
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    for m in re.finditer(r"""\b(?:src|href|xlink:href)\s*=\s*["']?([^"'\s>]*)""", page, re.I):
        assert m.group(1).startswith("#"), m.group(0)
    assert "<link" not in page and not re.search(r"<script[^>]*\bsrc", page) and "@import" not in page
    # the table: one row per run, the failed one with its error
    table = re.search(r'<table id="results-table".*?</table>', page, re.S).group(0)
    assert table.count("<tr") == 1 + len(result["runs"])
    for r in result["runs"]:
        assert f'<td class="name">{r["name"]}</td>' in table
    assert "failed: ValueError: no Linear layer matched" in table
    # the charts, inline
    for name in CHARTS:
        fig = re.search(rf'<figure class="chart" id="chart-{name}".*?</figure>', page, re.S)
        assert fig and "<svg" in fig.group(0), name
    assert "effective bits per weight" in page and "Pareto front" in page
    # the matrices and the diagrams (each SVG inline, its Mermaid text in a <details>)
    from polyquant.report.diagrams import all_diagrams
    assert "pq-matrix" in page and "Probed: what ran in this sweep" in page
    for name, d in all_diagrams().items():
        fig = re.search(rf'<figure class="diagram" id="diagram-{re.escape(name)}">.*?</figure>', page, re.S)
        assert fig, name
        assert "<svg" in fig.group(0) and "<details><summary>Mermaid source</summary><pre>" in fig.group(0)
        assert htmllib.escape(d.mermaid, quote=True) in fig.group(0)
    # ids stay unique across the inlined SVGs
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # environment and settings
    assert "torch" in page and "max_windows" in page and "calibration" in page
    assert "quanto supports bits 2, 4, 8 only" in page


def test_inline_svg_strips_what_names_a_url_and_prefixes_ids():
    svg = ('<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/x.dtd">\n'
           '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="10">'
           '<metadata><rdf:RDF xmlns:dc="http://purl.org/dc/elements/1.1/"/></metadata>'
           '<defs><path id="m1" d="M0 0"/><clipPath id="c1"><rect/></clipPath></defs>'
           '<use xlink:href="#m1"/><g clip-path="url(#c1)"><a href="#other">x</a></g></svg>')
    out = inline_svg(svg, "chart-a")
    assert "http" not in out and "<?xml" not in out and "DOCTYPE" not in out and "metadata" not in out
    assert 'id="chart-a-m1"' in out and 'xlink:href="#chart-a-m1"' in out and 'url(#chart-a-c1)' in out
    assert 'href="#other"' in out  # not an id of this SVG: left alone
    with pytest.raises(ValueError, match="svg must be an SVG document"):
        inline_svg("<p>no</p>", "x")


# -- Chromium ----------------------------------------------------------------------------------

def _chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        path = shutil.which(c)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        if os.environ.get("POLYQUANT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed but POLYQUANT_REQUIRE_CHROMIUM is set (run ./setup.sh --test)")
        pytest.skip("chromium is not installed (./setup.sh --test installs it; POLYQUANT_REQUIRE_CHROMIUM=1 "
                    "makes this a failure)")
    return path


def _run_chromium(binary: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,2400",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


# Runs after the page's own script: measures what the browser laid out, sorts the table by
# perplexity both ways, and writes it all as JSON into the DOM (read back through --dump-dom).
_MEASURE = """<script>
(function () {
  function box(el) {
    var r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    return {w: r.width, h: r.height, top: r.top + window.scrollY,
            shown: cs.display !== 'none' && cs.visibility !== 'hidden' && parseFloat(cs.opacity) > 0};
  }
  var out = {};
  var t = document.getElementById('results-table');
  out.table = box(t);
  out.rows = Array.prototype.map.call(t.tBodies[0].rows, function (r) { return box(r); });
  out.charts = Array.prototype.map.call(document.querySelectorAll('figure.chart'), function (f) {
    var s = f.querySelector('svg'), b = box(s);
    b.id = f.id; b.texts = s.querySelectorAll('text').length; return b; });
  out.diagrams = Array.prototype.map.call(document.querySelectorAll('figure.diagram'), function (f) {
    var s = f.querySelector('svg'), b = box(s);
    b.id = f.id; b.details = f.querySelectorAll('details').length; return b; });
  out.matrices = Array.prototype.map.call(document.querySelectorAll('#matrix table'), box);
  var heads = Array.prototype.slice.call(t.tHead.rows[0].cells);
  var col = heads.findIndex(function (h) { return h.textContent.trim() === 'ppl'; });
  var column = function () {
    return Array.prototype.map.call(t.tBodies[0].rows, function (r) { return r.cells[col].getAttribute('data-v'); });
  };
  heads[col].click(); out.asc = column(); out.asc_state = heads[col].getAttribute('aria-sort');
  heads[col].click(); out.desc = column();
  var pre = document.createElement('pre');
  pre.id = 'pq-measure'; pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>"""


def _sorted_ok(values: list, reverse: bool) -> bool:
    nums = [float(v) for v in values if v not in ("", None)]
    missing_last = all(v in ("", None) for v in values[len(nums):])
    return missing_last and nums == sorted(nums, reverse=reverse)


def test_report_renders_in_chromium(report, chromium, tmp_path):
    from matplotlib.image import imread
    out, result = report
    page = (out / "report.html").read_text()
    measured = tmp_path / "measure.html"
    measured.write_text(page.replace("</body>", _MEASURE + "</body>"))
    proc = _run_chromium(chromium, tmp_path, measured.as_uri(), "--dump-dom", "--virtual-time-budget=5000")
    m = re.search(r'<pre id="pq-measure">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no measurements in the dumped DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    data = json.loads(htmllib.unescape(m.group(1)))

    assert data["table"]["shown"] and data["table"]["w"] > 600 and data["table"]["h"] > 100
    assert len(data["rows"]) == len(result["runs"]) and all(r["h"] > 5 and r["shown"] for r in data["rows"])
    assert [c["id"] for c in data["charts"]] == [f"chart-{n}" for n in CHARTS]
    for c in data["charts"]:
        assert c["shown"] and c["w"] > 400 and c["h"] > 150 and c["texts"] > 10, c
    from polyquant.report.diagrams import all_diagrams
    assert len(data["diagrams"]) == len(all_diagrams())
    for d in data["diagrams"]:
        assert d["shown"] and d["w"] > 100 and d["h"] > 50 and d["details"] == 1, d
    assert len(data["matrices"]) >= 2 and all(t["shown"] and t["w"] > 100 and t["h"] > 20 for t in data["matrices"])
    # the table sorts by perplexity, both ways, the failed run (no ppl) last
    assert data["asc_state"] == "ascending"
    assert _sorted_ok(data["asc"], reverse=False) and _sorted_ok(data["desc"], reverse=True)
    assert data["asc"][-1] == "" and data["asc"] != data["desc"]

    shot = tmp_path / "shot.png"
    proc = _run_chromium(chromium, tmp_path, (out / "report.html").as_uri(), f"--screenshot={shot}")
    assert shot.is_file(), proc.stderr[-2000:]
    img = imread(shot)[..., :3]
    assert img.shape[0] >= 2000 and img.shape[1] >= 1200
    ink = (img.mean(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert ink > 0.03 and img.std() > 0.05, f"the screenshot looks blank (ink {ink:.4f})"
