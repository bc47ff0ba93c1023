"""The advisor: the least-loss option that fits, measured results preferred to the prior table,
rejections with their reasons (memory, kernel on the device, ppl limit, failed runs), a refusal
when nothing qualifies, parameter counts without weights, and the three CLI commands end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_llama, run_cli as run, tiny_model_dir

from polyquant.methods import RTNConfig
from polyquant.methods.gptq import GPTQConfig
from polyquant.report.advisor import (PRIORS, ModelSize, model_size, parse_ppl_increase, parse_size, prior_for,
                                      recommend)

TINY = ModelSize("tiny", total_params=250, quantized_params=200)


def rec(name, config, ppl, wb, kernel=None, status="ok", device="cpu", model="tiny", error=None):
    r = {"name": name, "method": config.method if config else "fp32",
         "setting": config.describe() if config else "unquantized", "config": config.to_dict() if config else None,
         "model": model, "settings": {"seqlen": 16, "max_windows": 2}, "device": device, "status": status,
         "kernel": kernel or {}, "metrics": {"ppl": ppl, "weight_bytes": wb}}
    if error:
        r["error"] = error
    return r


def sweep():
    return {"runs": [
        rec("fp32", None, 10.0, 1000, {"dense": 1}),
        rec("w8", RTNConfig(bits=8, group_size=-1), 10.05, 500, {"cpu-int8": 4}),          # +0.5 %
        rec("w4-sym", RTNConfig(bits=4, group_size=64), 11.0, 300, {"cpu-int4": 4}),       # +10 %
        rec("w4-asym", RTNConfig(bits=4, group_size=64, sym=False), 10.6, 320, {"cpu-int4": 4}),  # +6 %
        rec("w3", RTNConfig(bits=3, group_size=64), 15.0, 260, {"reference": 4}),          # +50 %, slow
        rec("gptq", GPTQConfig(bits=4, group_size=64), None, None, status="failed", error="RuntimeError: boom"),
    ]}


def by(options, method, setting):
    (o,) = [o for o in options if o.method == method and o.setting == setting]
    return o


def test_picks_the_least_loss_option_that_fits():
    r = recommend(TINY, "cpu", 600, results=sweep())
    assert r.ok and (r.choice.method, r.choice.setting, r.choice.evidence) == ("rtn", "rtn w8 pc sym", "measured")
    assert r.choice.ppl_increase == pytest.approx(0.005) and r.choice.weight_bytes == 500
    assert r.choice.kernel == "cpu-int8" and "ran on cpu-int8" in r.choice.kernel_note
    fp = by(r.rejected, "fp32", "unquantized")
    assert fp.rejected.startswith("does not fit: ") and fp.weight_bytes == 1000
    assert "measured: ppl 10.050 vs fp32 10.000" in r.explain()
    # a smaller budget: the 8-bit run no longer fits, the better of the two 4-bit runs wins
    r = recommend(TINY, "cpu", 400, results=sweep())
    assert r.choice.setting == "rtn w4 g64 asym" and r.choice.ppl_increase == pytest.approx(0.06)
    assert "does not fit" in by(r.rejected, "rtn", "rtn w8 pc sym").rejected
    assert by(r.accepted, "rtn", "rtn w4 g64 sym").ppl_increase == pytest.approx(0.10)


def test_ppl_limit_rejects_and_nothing_left_is_a_refusal():
    r = recommend(TINY, "cpu", 400, "5%", results=sweep())
    assert not r.ok and r.choice is None
    assert "over the +5.00% limit" in by(r.rejected, "rtn", "rtn w4 g64 asym").rejected
    assert "exceed the +5.00% ppl limit" in r.reason
    r = recommend(TINY, "cpu", 400, "7%", results=sweep())
    assert r.ok and r.choice.setting == "rtn w4 g64 asym"


def test_reference_only_is_rejected_unless_allowed():
    r = recommend(TINY, "cpu", 265, results=sweep())
    w3 = by(r.rejected, "rtn", "rtn w3 g64 sym")
    assert "no fast kernel on cpu" in w3.rejected and "does not fit" not in w3.rejected
    r = recommend(TINY, "cpu", 265, results=sweep(), allow_reference=True)
    assert r.ok and r.choice.setting == "rtn w3 g64 sym" and r.choice.evidence == "measured"


def test_failed_runs_are_rejected_with_their_error():
    r = recommend(TINY, "cpu", 10**6, results=sweep())
    g = by(r.rejected, "gptq", GPTQConfig(bits=4, group_size=64).describe())
    assert g.rejected == "failed in the sweep: RuntimeError: boom" and g.evidence == "measured"


def test_measured_is_preferred_to_the_prior():
    runs = [rec("fp32", None, 10.0, 1000, {"dense": 1}),
            rec("w4-sym", RTNConfig(bits=4, group_size=64), 13.0, 300, {"cpu-int4": 4})]  # +30 %
    r = recommend(TINY, "cpu", 400, results={"runs": runs})
    assert r.choice.setting == "rtn w4 g64 sym" and r.choice.evidence == "measured"
    # gptq's prior (+17 %) is lower and fits, but it was not measured
    gptq = by(r.accepted, "gptq", GPTQConfig(bits=4, group_size=64).describe())
    assert gptq.evidence == "prior" and gptq.ppl_increase < r.choice.ppl_increase
    assert "measured options are preferred" in r.reason
    # the measurement replaces the prior of the same setting
    assert [o.evidence for o in r.accepted + r.rejected if o.setting == "rtn w4 g64 sym"] == ["measured"]
    # a record of another model: the loss is measured, the bytes are estimated for this model
    other = [dict(x, model="other") for x in runs]
    o = by(recommend(TINY, "cpu", 400, results={"runs": other}).accepted, "rtn", "rtn w4 g64 sym")
    assert o.ppl_increase == pytest.approx(0.3) and "estimated for tiny" in o.bytes_note
    assert o.weight_bytes == int(-(-(200 * 4.5 / 8 + 50 * 4) // 1))


def test_without_results_the_prior_table_decides():
    size = ModelSize("m", 10_000_000, 9_000_000)
    r = recommend(size, "cpu", "12MB")
    assert r.ok and r.choice.evidence == "prior" and r.choice.weight_bytes <= 12_000_000
    best = min(o.ppl_increase for o in r.accepted)
    assert r.choice.ppl_increase == best
    assert r.choice.fast and r.choice.kernel in ("cpu-int4", "cpu-lut4", "cpu-int8")
    assert all(o.rejected for o in r.rejected)
    assert "fp32" in [o.method for o in r.rejected]  # 40 MB
    # the prior of the chosen setting is the table's entry
    inc, src = prior_for(r.choice.method, r.choice.config.get("bits"),
                         "pc" if r.choice.config.get("group_size") == -1 else f"g{r.choice.config.get('group_size')}",
                         r.choice.config.get("sym"))
    assert inc == r.choice.ppl_increase and src == r.choice.ppl_note


def test_a_budget_nothing_fits_is_refused_with_the_reason():
    r = recommend(TINY, "cpu", 100, results=sweep())
    assert not r.ok and r.reason.startswith("nothing fits 0.0 MB: the smallest option")
    r = recommend(ModelSize("m", 10_000_000, 9_000_000), "cpu", "1MB")
    assert not r.ok and "nothing fits" in r.reason and "needs" in r.reason
    assert "no recommendation: nothing fits" in r.explain()


def test_the_device_decides_the_kernels():
    size = ModelSize("m", 10_000_000, 9_000_000)
    hi = recommend(size, "cuda", "1GB", capability="9.0")
    lo = recommend(size, "cuda", "1GB", capability=(8, 0))
    setting = "fp8 w:channel a:dynamic"
    f_hi, f_lo = by(hi.accepted, "fp8", setting), by(lo.rejected, "fp8", setting)
    assert f_hi.fast and f_hi.kernel == "fp8-scaled-mm" and "compute capability >= 8.9" in f_hi.kernel_note
    assert not f_lo.fast and "no fast kernel on cuda" in f_lo.rejected
    mps = recommend(size, "mps", "1GB", allow_reference=True)
    f = by(mps.rejected, "fp8", setting)
    assert f.kernel is None and "float8" in f.rejected
    assert by(mps.accepted, "rtn", "rtn w8 pc sym").kernel == "reference"


def test_a_measured_cpu_run_says_nothing_about_cuda_kernels():
    pytest.importorskip("triton")  # the declared CUDA kernel for int8 weights is Triton's
    r = recommend(TINY, "cuda", 600, results=sweep(), capability="8.0")
    assert r.choice.setting == "rtn w8 pc sym" and r.choice.kernel == "triton-w4a16"
    assert r.choice.kernel_note.startswith("declared")


@pytest.mark.parametrize("kw, field", [(dict(device="tpu"), "device"), (dict(memory_bytes="4XB"), "memory_bytes"),
                                       (dict(memory_bytes=0), "memory_bytes"),
                                       (dict(max_ppl_increase="5"), "max_ppl_increase"),
                                       (dict(max_ppl_increase="-1%"), "max_ppl_increase"),
                                       (dict(capability="8.9"), "capability"),
                                       (dict(model=0), "model"), (dict(results={"x": 1}), "results")])
def test_invalid_input_names_the_field(kw, field):
    args = dict(model=TINY, device="cpu", memory_bytes=1000, max_ppl_increase=None, results=None)
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        recommend(**args)


def test_parsers():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("800000") == 800_000 and parse_size(42) == 42
    assert parse_ppl_increase("5%") == pytest.approx(0.05) and parse_ppl_increase("0.05") == 0.05
    assert parse_ppl_increase("150%") == pytest.approx(1.5)
    for bad in ("", "GB", "4 parsecs", "-3MB"):
        with pytest.raises(ValueError, match="memory"):
            parse_size(bad)
    assert {p.method for p in PRIORS} <= set(__import__("polyquant").METHODS)
    assert prior_for("rtn", 4, "g64", False)[0] == pytest.approx(18.129 / 14.007 - 1, abs=1e-4)  # README
    assert prior_for("rtn", 4, "g128", True)[1].startswith("assumed: no entry")


# -- parameter counts --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=3, name="adv")


def test_model_size_from_config_without_weights(tiny_dir, tmp_path):
    from polyquant.nn.select import select_linears
    bare = tmp_path / "config-only"  # no weights at all: the count comes from config.json
    bare.mkdir()
    (bare / "config.json").write_text((tiny_dir / "config.json").read_text())
    s = model_size(str(bare))
    m = tiny_llama(seed=3)
    assert s.total_params == sum(p.numel() for p in m.parameters())
    assert s.quantized_params == sum(l.weight.numel() for _, l in select_linears(m)) > 0
    assert "meta device" in s.how
    assert model_size(1000).quantized_params == 1000


# -- the CLI -----------------------------------------------------------------------------------

def test_cli_recommend(capsys, tmp_path, tiny_dir):
    code, out, err = run(capsys, "recommend", tiny_dir, "--memory", "1GB", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["ok"] and d["choice"]["method"] == "fp32" and d["device"] == "cpu"  # the float model fits
    code, out, err = run(capsys, "recommend", tiny_dir, "--memory", "100B")
    assert code == 1 and "nothing fits" in out and err.startswith("polyquant: no recommendation: nothing fits")
    code, _, err = run(capsys, "recommend", tiny_dir, "--memory", "4XB")
    assert code == 2 and "--memory must be a size" in err
    code, _, err = run(capsys, "recommend", tiny_dir, "--memory", "1GB", "--max-ppl-increase", "7")
    assert code == 2 and "ambiguous" in err
    # measured results of this model: weight bytes as measured
    res = sweep()
    for r in res["runs"]:
        r["model"] = str(tiny_dir)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(res))
    code, out, err = run(capsys, "recommend", tiny_dir, "--memory", "450B", "--results", tmp_path / "sweep")
    assert code == 0, err
    assert "recommended: rtn [rtn w4 g64 asym]: 0.0 MB (measured in run 'w4-asym'" in out
    code, _, err = run(capsys, "recommend", tiny_dir, "--memory", "1GB", "--results", tmp_path / "none.json")
    assert code == 2 and "no such file" in err


def test_cli_matrix(capsys, tmp_path):
    from polyquant.methods import METHODS
    code, out, _ = run(capsys, "matrix")
    assert code == 0 and out.startswith("## Declared") and all(f"`{m}`" in out for m in METHODS)
    code, out, _ = run(capsys, "matrix", "--format", "json")
    d = json.loads(out)
    assert {r["method"] for r in d["declared"]} == set(METHODS) and d["probed"] is None
    assert set(d["devices"]) == {"cpu", "cuda", "rocm", "mps", "xpu"}
    p = tmp_path / "results.json"
    p.write_text(json.dumps(sweep()))
    code, out, _ = run(capsys, "matrix", "--format", "html", "--results", p)
    assert code == 0 and 'class="pq-matrix-probed"' in out and "RuntimeError: boom" in out
    code, out, _ = run(capsys, "matrix", "--results", p)
    assert "## Probed" in out and "cpu-int4×4" in out


def test_cli_diagrams(capsys, tmp_path):
    import xml.etree.ElementTree as ET
    code, out, _ = run(capsys, "diagrams")
    assert code == 0 and out.count("```mermaid\n") == 3
    code, out, _ = run(capsys, "diagrams", "pipeline")
    assert code == 0 and out.startswith("sequenceDiagram")
    code, out, _ = run(capsys, "diagrams", "-o", tmp_path / "d")
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == sorted(f"{n}.{e}" for n in ("technique-map", "pipeline", "integration") for e in ("mmd", "svg"))
    for p in (tmp_path / "d").glob("*.svg"):
        ET.parse(p)
    code, _, _ = run(capsys, "diagrams", "integration", "-o", tmp_path / "e", "--format", "svg")
    assert code == 0 and [p.name for p in (tmp_path / "e").iterdir()] == ["integration.svg"]
    code, _, err = run(capsys, "diagrams", "--format", "svg")
    assert code == 2 and "give -o DIR" in err
    code, _, err = run(capsys, "diagrams", "nope")
    assert code == 2 and "unknown diagram 'nope'" in err


@pytest.mark.parametrize("cmd", ["matrix", "diagrams", "recommend"])
def test_help(capsys, cmd):
    code, out, _ = run(capsys, cmd, "--help")
    assert code == 0 and out.startswith(f"usage: polyquant {cmd}")
