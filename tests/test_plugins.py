"""Third-party plug-ins: a toy method in a package of its own (a dist-info folder with an entry
point on sys.path, as pip installs one) appears in ``polyquant methods``, runs in ``quantize`` and
``compare``, has a compatibility-matrix row and a technique-map node - with no polyquant file
edited; a broken plug-in is reported by name and the built-ins stay."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from helpers import tiny_llama, tiny_tokenizer_dir

TOY = '''
"""toyquant: RTN with a fixed scale (a plug-in of polyquant through an entry point)."""
from dataclasses import dataclass

import torch

from polyquant.methods import MethodConfig, MethodSpec
from polyquant.methods.traits import Preset, Prior
from polyquant.qtypes import int_qtype
from polyquant.tensor.quantized_weight import QuantizedWeight


@dataclass
class ToyConfig(MethodConfig):
    bits: int = 8
    scale: float = 0.002

    def validate(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    def describe(self):
        return f"toy w{self.bits} s{self.scale:g}"


def toy_quantize(weight, config, stats=None):
    qt = int_qtype(config.bits, signed=True)
    w = weight.detach().float()
    scale = torch.full((w.shape[0], 1), config.scale)
    codes = qt.encode(torch.clamp(torch.round(w / scale), qt.qmin, qt.qmax))
    return QuantizedWeight.from_codes(codes, qt.name, (1, w.shape[1]), scale, None)


SPEC = MethodSpec(name="toy-fixed", config_cls=ToyConfig, quantize_weight=toy_quantize, needs_calibration=False,
                  family="integer weight-only", bits=(8,), formats=("compressed-tensors",),
                  description="RTN with a fixed scale (a test plug-in)", presets=(Preset("toy-w8"),),
                  priors=(Prior(8, None, None, 0.01, "assumed: a test plug-in"),))
'''


def _dist(site: Path) -> None:
    (site / "toyquant").mkdir(parents=True)
    (site / "toyquant" / "__init__.py").write_text(TOY)
    (site / "toyquant_broken.py").write_text("raise RuntimeError('this plug-in is broken on purpose')\n")
    info = site / "toyquant-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyquant\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [polyquant.methods]
        toy-fixed = toyquant:SPEC
        toy-broken = toyquant_broken
        """))


@pytest.fixture()
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _dist(site)
    monkeypatch.syspath_prepend(str(site))
    yield site
    from polyquant import plugins
    from polyquant.methods import unregister_method
    unregister_method("toy-fixed")
    for g in plugins.GROUPS:
        plugins.LOADED[g].pop("toy-fixed", None)
        plugins.PLUGIN_ERRORS[g].pop("toy-broken", None)
    sys.modules.pop("toyquant", None)


def test_a_plugin_method_is_listed_when_polyquant_starts_and_a_broken_one_is_named(site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site)] + sys.path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "polyquant", "methods", "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    names = {m["name"] for m in json.loads(r.stdout)}
    assert "toy-fixed" in names and {"rtn", "gptq", "awq", "bnb-nf4"} <= names  # built-ins intact
    assert "toy-broken" in r.stderr and "broken on purpose" in r.stderr


def test_the_listings_name_the_plugins_that_failed(site, capsys, monkeypatch):
    """``polyquant methods | formats | kernels`` print each failed plug-in by name with its error:
    under the table, or on stderr for --json / --markdown (whose stdout stays the listing alone)."""
    from polyquant import plugins
    from polyquant.cli import main
    from polyquant.methods import MethodSpec, register_method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugins.load_plugins("polyquant.methods", register_method, lambda o: isinstance(o, MethodSpec))
    assert main(["methods"]) == 0
    o = capsys.readouterr().out
    assert "toy-fixed" in o and "failed to load (polyquant.methods" in o
    assert "toy-broken: RuntimeError: this plug-in is broken on purpose" in o
    assert main(["methods", "--json"]) == 0
    r = capsys.readouterr()
    assert "toy-broken" not in r.out and "toy-broken: RuntimeError" in r.err
    json.loads(r.out)
    monkeypatch.setitem(plugins.PLUGIN_ERRORS, "polyquant.formats", {"bad-format": "ImportError: no module x"})
    monkeypatch.setitem(plugins.PLUGIN_ERRORS, "polyquant.kernels", {"bad-kernel": "ValueError: taken name"})
    assert main(["formats"]) == 0 and "bad-format: ImportError: no module x" in capsys.readouterr().out
    assert main(["kernels"]) == 0 and "bad-kernel: ValueError: taken name" in capsys.readouterr().out
    assert main(["formats", "--markdown"]) == 0
    r = capsys.readouterr()
    assert "bad-format" not in r.out and "bad-format" in r.err


def test_a_plugin_method_quantizes_compares_and_is_in_matrix_and_diagrams(site, tmp_path, capsys):
    from polyquant.cli import main
    from polyquant.methods import METHODS, MethodSpec, register_method
    from polyquant.plugins import load_plugins, plugin_errors
    from polyquant.report.compare import build_runs
    from polyquant.report.diagrams import technique_map_model
    from polyquant.report.matrix import declared_matrix

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = load_plugins("polyquant.methods", register_method, lambda o: isinstance(o, MethodSpec))
    assert set(errors) == {"toy-broken"} and "RuntimeError" in errors["toy-broken"]
    assert any("toy-broken" in str(w.message) for w in caught) and "toy-broken" in plugin_errors()["polyquant.methods"]
    assert "toy-fixed" in METHODS and "rtn" in METHODS

    model_dir = tmp_path / "tiny"
    tiny_llama(seed=3).save_pretrained(str(model_dir), safe_serialization=True)
    tiny_tokenizer_dir(model_dir)
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--method", "toy-fixed", "-o", str(out), "-q"]) == 0
    assert json.loads((out / "polyquant.json").read_text())["method"] == "toy-fixed"

    runs, _ = build_runs(["toy-fixed"])
    assert [r.name for r in runs] == ["fp32", "toy-w8"]  # its preset is the default row
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250}" for i in range(600)))
    rep = tmp_path / "rep"
    assert main(["compare", str(model_dir), "-o", str(rep), "--methods", "toy-fixed", "--seqlen", "16",
                 "--max-windows", "2", "--no-speed", "--text", str(text), "-q"]) == 0
    recs = {r["name"]: r for r in json.loads((rep / "results.json").read_text())["runs"]}
    assert recs["toy-w8"]["status"] == "ok" and recs["toy-w8"]["metrics"]["ppl"] > 0
    capsys.readouterr()

    rows = [r for r in declared_matrix() if r["method"] == "toy-fixed"]
    assert rows and rows[0]["bits"] == 8
    nodes = [n for n in technique_map_model().nodes if n.lines[0] == "toy-fixed"]
    assert len(nodes) == 1
