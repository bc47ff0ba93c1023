"""``compare``: the run list built from the registry (headline settings, grids, refused
combinations skipped with the reason), one record per run written as it finishes (config, versions,
seed, device, kernel, timings, effective size, calibration), resume without redoing finished runs
(also after the process is killed), failed runs recorded while the sweep goes on, the progress
bar, the reference-logit cache, the summary table, and the ``compare`` / ``report`` commands."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import AUTO_INT4, tiny_model_dir, words

import polyquant
import polyquant.eval
import polyquant.nn
from polyquant.cli import main
from polyquant.methods import METHODS, RTNConfig
from polyquant.methods.base import MethodConfig, check_choice
from polyquant.methods.gptq import GPTQConfig
from polyquant.methods.registry import MethodSpec, register_method, unregister_method
from polyquant.report.compare import (HEADLINE, SUMMARY_HEADERS, CachedReference, Run, build_runs, run_compare,
                                      summary_markdown, summary_rows)
from polyquant.report.store import ResultsStore


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=2, name="tiny")


@pytest.fixture(scope="module")
def text() -> str:
    return words(1000, seed=1)


@pytest.fixture
def counted(monkeypatch):
    """Count (and optionally sabotage) evaluate() calls made by compare."""
    real = polyquant.eval.evaluate
    calls: list[str] = []
    state = {"fail": None}

    def wrapper(model, tok, **kw):
        rec = getattr(model, "polyquant", None)
        label = rec.config.get("bits", rec.method) if rec is not None else "fp"
        calls.append(label)
        if state["fail"] is not None:
            state["fail"](label, len(calls))
        return real(model, tok, **kw)

    monkeypatch.setattr(polyquant.eval, "evaluate", wrapper)
    return calls, state


@pytest.fixture
def quantized(monkeypatch):
    """Count quantize_model calls made by compare (the setting of each)."""
    from polyquant.methods import apply
    real = apply.quantize_model
    calls: list[str] = []

    def wrapper(model, config, *a, **kw):
        calls.append(config.describe())
        return real(model, config, *a, **kw)

    monkeypatch.setattr(apply, "quantize_model", wrapper)
    return calls


@dataclass
class ExplodingConfig(MethodConfig):
    bits: int = 4

    def validate(self) -> None:
        check_choice("bits", self.bits, (4,))

    def describe(self) -> str:
        return f"exploding w{self.bits}"


def _explode(weight, config, stats):
    raise RuntimeError("this method always fails")


@pytest.fixture
def exploding_method():
    """A registered method whose quantize function raises."""
    spec = register_method(MethodSpec(name="test-exploding", config_cls=ExplodingConfig, quantize_weight=_explode,
                                      needs_calibration=False, family="integer weight-only", bits=(4,),
                                      formats=("compressed-tensors",)))
    yield spec
    unregister_method(spec.name)


def sweep() -> list[Run]:
    return [Run("fp32"), Run("w8", RTNConfig(bits=8, group_size=-1)), Run("w4", RTNConfig(bits=4, group_size=32)),
            Run("broken", RTNConfig(include=["^no-such-module$"]))]


KW = dict(seqlen=16, max_windows=2, measure_speed=False, show_progress=False)


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["runs"]


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_one_record_per_run_failures_recorded_and_resume(tmp_path, tiny_dir, text, counted):
    calls, _ = counted
    out = tmp_path / "report"
    res = run_compare(tiny_dir, out, sweep(), text=text, **KW)
    recs = results(out)
    assert res["runs"] == recs
    assert [r["name"] for r in recs] == ["fp32", "w8", "w4", "broken"]
    assert [r["status"] for r in recs] == ["ok", "ok", "ok", "failed"]
    assert "no Linear layer matched" in recs[3]["error"]
    assert calls == ["fp", 8, 4]  # the broken run failed in quantize, before evaluate
    assert len(jsonl(out)) == 4
    assert not (out / ".reference-logits").exists()
    fp, w8, w4 = recs[:3]
    assert w8["config"] == RTNConfig(bits=8, group_size=-1).to_dict() and fp["config"] is None
    for r in recs[:3]:
        assert math.isfinite(r["metrics"]["ppl"]) and r["metrics"]["windows"] == 2
        assert r["versions"]["torch"] == __import__("torch").__version__ and r["seed"] == 0
        assert r["device"] == "cpu" and r["timings"]["eval_s"] > 0 and r["settings"]["max_windows"] == 2
    assert fp["metrics"]["kl"] is None
    assert 0 <= w8["metrics"]["kl"] < w4["metrics"]["kl"]  # 8 bits stay closer to the reference
    assert w8["kernel"] == {"cpu-int8": 14} and w4["kernel"] == {AUTO_INT4: 14}
    model = polyquant.load_model(tiny_dir)[0]
    params = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers.")
                 and isinstance(m, __import__("torch").nn.Linear))
    assert fp["size"] == {"quantized_layers": 14, "quantized_params": params, "quantized_bytes": 4 * params,
                          "bits_per_weight": 32.0}
    assert w8["size"]["quantized_params"] == w4["size"]["quantized_params"] == params
    # 4-bit codes + one fp32 scale per 32 weights; 8-bit codes + one fp32 scale per row of 64 or 128 inputs
    assert w4["size"]["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert 8 + 32 / 128 < w8["size"]["bits_per_weight"] < 8 + 32 / 64
    assert w8["timings"]["quantize_s"] > 0 and w8["calibration"] is None and fp["timings"]["quantize_s"] == 0

    # rerun: nothing finished is redone; the failed run is tried again (and fails again)
    calls.clear()
    run_compare(tiny_dir, out, sweep(), text=text, **KW)
    assert calls == []
    assert [r["status"] for r in results(out)] == ["ok", "ok", "ok", "failed"]
    assert len(jsonl(out)) == 5
    assert results(out)[:3] == recs[:3]
    inv = json.loads((out / "results.json").read_text())["invocations"]
    assert [(x["runs"], x["reused"]) for x in inv] == [(4, 0), (4, 3)] and all(x["wall_s"] > 0 for x in inv)

    # other settings are refused (naming the difference), or start over with resume=False
    with pytest.raises(ValueError, match=r"max_windows: 2 in the folder, 1 now"):
        run_compare(tiny_dir, out, sweep()[:2], text=text, **{**KW, "max_windows": 1})
    assert calls == [] and len(jsonl(out)) == 5
    run_compare(tiny_dir, out, sweep()[:2], text=text, **{**KW, "max_windows": 1}, resume=False)
    assert calls == ["fp", 8]
    assert [r["settings"]["max_windows"] for r in results(out)] == [1, 1] and len(jsonl(out)) == 2
    assert sorted(p.name.split("-", 1)[1] for p in (out / "previous").iterdir()) == [
        "results.json", "runs.jsonl", "sweep.json"]  # the earlier sweep, moved aside


def test_interrupted_sweep_resumes_and_an_eval_error_is_recorded(tmp_path, tiny_dir, text, counted):
    calls, state = counted
    out = tmp_path / "report"

    def interrupt(label, n):
        if n == 2:
            raise KeyboardInterrupt

    state["fail"] = interrupt
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_dir, out, sweep()[:3], text=text, **KW)
    assert [r["name"] for r in results(out)] == ["fp32"]  # written as soon as it finished
    assert not (out / ".reference-logits").exists()

    def eval_error(label, n):
        if label == 8:
            raise RuntimeError("kernel exploded")

    state["fail"] = eval_error
    calls.clear()
    run_compare(tiny_dir, out, sweep()[:3], text=text, **KW)
    assert calls == [8, 4]  # fp32 was not redone
    recs = results(out)
    assert [r["status"] for r in recs] == ["ok", "failed", "ok"]
    assert recs[1]["error"] == "RuntimeError: kernel exploded" and "Traceback" in recs[1]["traceback"]


def test_speed_at_threads_windows_at_eval_threads_and_short_decode_on_slow_kernels(tmp_path, tiny_dir, text,
                                                                                      counted):
    from polyquant.methods.rtn import RTNConfig
    calls, _ = counted
    runs = [Run("fp32"), Run("w6", RTNConfig(bits=6, group_size=32))]  # 6-bit: only the reference kernel (not a fast path)
    res = run_compare(tiny_dir, tmp_path / "r", runs, text=text, seqlen=16, max_windows=2, threads=1, eval_threads=2,
                      decode_tokens=16, slow_decode_tokens=8, show_progress=False)
    fp, w6 = res["runs"]
    assert calls == ["fp", "fp", 6, 6]  # an accuracy pass and a speed pass each
    assert w6["kernel"] == {"reference": 14}
    assert fp["metrics"]["decode_tokens"] == 16 and w6["metrics"]["decode_tokens"] == 8
    assert w6["notes"] == ["decode timed over 8 tokens: the reference kernel is not a fast path"]
    for r in (fp, w6):
        m = r["metrics"]
        assert (m["threads"], m["eval_threads"], m["windows"]) == (1, 2, 2) and m["decode_tok_s"] > 0
    assert w6["metrics"]["kl"] > 0


def test_torn_last_line_is_ignored_and_not_glued_to_the_next_record(tmp_path):
    store = ResultsStore(tmp_path)
    store.append({"key": "a", "status": "ok"})
    with open(store.jsonl_path, "a") as f:
        f.write('{"key": "b", "sta')  # killed mid-write
    assert list(store.finished()) == ["a"]
    store.append({"key": "c", "status": "ok", "x": float("nan")})
    assert [r["key"] for r in store.records()] == ["a", "c"]
    assert store.records()[1]["x"] is None


def test_cached_reference_gives_identical_kl(tmp_path, tiny_dir, text):
    model, tok = polyquant.load_model(tiny_dir)
    q = polyquant.quantize(model, RTNConfig(bits=4, group_size=32), show_progress=False)
    plain = polyquant.evaluate(q, tok, text=text, reference=model, **KW)
    cached = CachedReference(model, tmp_path / "cache")
    first = polyquant.evaluate(q, tok, text=text, reference=cached, **KW)
    second = polyquant.evaluate(q, tok, text=text, reference=cached, **KW)
    assert (cached.misses, cached.hits) == (2, 2)
    assert plain["kl"] == first["kl"] == second["kl"] and plain["top1"] == second["top1"]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    # the baseline's own evaluation fills a cache through a hook: no reference forward at all later
    cached = CachedReference(model, tmp_path / "cache2")
    handle = cached.recording_hook()
    polyquant.evaluate(model, tok, text=text, **KW)
    handle.remove()
    assert len(list((tmp_path / "cache2").glob("*.npy"))) == 2
    again = polyquant.evaluate(q, tok, text=text, reference=cached, **KW)
    assert (cached.misses, cached.hits) == (0, 2)
    assert again["kl"] == plain["kl"] and again["top1"] == plain["top1"]


def test_summary_rows_relative_columns():
    def rec(name, cfg, ppl, dec, status="ok"):
        return {"name": name, "method": "rtn" if cfg else "fp32", "setting": name, "config": cfg, "status": status,
                "metrics": {"ppl": ppl, "decode_tok_s": dec, "kl": 0.01, "top1": 0.9, "weight_bytes": 2_500_000,
                            "kernel": "cpu-int4"} if status == "ok" else None, "error": "ValueError: no"}
    rows = summary_rows({"runs": [rec("fp", None, 10.0, 20.0), rec("a", {"bits": 4}, 11.0, 30.0),
                                  rec("b", {"bits": 3}, None, None, "failed")]})
    cols = {h: i for i, h in enumerate(SUMMARY_HEADERS)}
    assert rows[1][cols["Δppl %"]] == "+10.00" and rows[1][cols["vs fp32"]] == "1.50"
    assert rows[1][cols["weight MB"]] == "2.5" and rows[0][cols["Δppl %"]] == "+0.00"
    assert rows[2][cols["ppl"]] == "-" and rows[2][cols["status"]].startswith("FAILED: ValueError")


def test_summary_markdown_lists_settings_runs_failures_and_skips():
    res = {"model": "m", "settings": {"max_windows": 2, "seqlen": 16, "calibration": {"samples": 4}},
           "skipped": [{"method": "quanto", "setting": "bits=3", "reason": "quanto supports bits 2, 4, 8 only"}],
           "runs": [{"name": "fp32", "method": "fp32", "setting": "unquantized", "config": None, "status": "ok",
                     "metrics": {"ppl": 10.0}},
                    {"name": "x", "method": "rtn", "setting": "a|b", "config": {}, "status": "failed",
                     "error": "ValueError: bad"}]}
    md = summary_markdown(res)
    assert "2 runs (1 failed)" in md and "2 windows of 16 tokens" in md and "| " + " | ".join(SUMMARY_HEADERS) in md
    assert "a\\|b" in md and "- `x`: ValueError: bad" in md and "quanto bits=3: quanto supports bits 2, 4, 8 only" in md


# -- the run list ------------------------------------------------------------------------------

def test_default_run_list_covers_every_registered_method_at_its_headline_setting(exploding_method):
    runs, skipped = build_runs()
    assert runs[0] == Run("fp32")
    # methods whose presets are all opt-in (sweep=False: AQLM's code book search) are listed, not run
    opt_in = {m for m, s in METHODS.items() if s.presets and not any(p.sweep for p in s.presets)}
    assert {x["method"] for x in skipped} == opt_in
    assert all(f"--methods {x['method']}" in x["reason"] for x in skipped)
    assert {r.method for r in runs[1:]} == set(METHODS) - opt_in  # every other method, the new one too
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    for name, method, fields in HEADLINE:
        run = next(r for r in runs if r.name == name)
        assert run.method == method and all(getattr(run.config, k) == v for k, v in fields.items())
    new = [r for r in runs if r.method == "test-exploding"]
    assert len(new) == 1 and new[0].name == "test-exploding" and new[0].config == ExplodingConfig()
    assert all(r.config.quantize_lm_head is False for r in runs[1:])


def test_grid_run_list_and_refused_combinations():
    runs, skipped = build_runs(["rtn", "quanto", "torchao-int4", "bnb-nf4", "eetq"], bits=[3, 4, 8],
                               group_sizes=[32, 100])
    got = {(r.method, r.setting) for r in runs[1:]}
    assert {("rtn", f"rtn w{b} g{g} sym") for b in (3, 4, 8) for g in (32, 100)} <= got
    assert ("quanto", "quanto qint4 g32") in got and ("quanto", "quanto qint8") in got
    assert ("torchao-int4", "torchao int4 g32") in got and ("bnb-nf4", "bnb nf4 b64") in got
    assert ("eetq", "eetq w8a16 per-channel") in got
    assert len(runs) == 1 + 6 + 3 + 1 + 1 + 1
    reasons = {(x["method"], x["setting"]): x["reason"] for x in skipped}
    assert reasons[("quanto", "bits=3")] == "quanto supports bits 2, 4, 8 only"
    assert "group_size must be one of [32, 64, 128, 256], got 100" in reasons[("torchao-int4", "group_size=100")]
    assert reasons[("quanto", "bits=8 group_size=100")].startswith("same setting as run quanto-qint8")
    # a fixed-width method is left out when its width was not asked for
    runs, skipped = build_runs(["eetq", "rtn"], bits=[4])
    assert [r.method for r in runs] == ["fp32", "rtn", "rtn"] and "eetq is 8-bit only" in skipped[0]["reason"]
    assert {r.setting for r in runs[1:]} == {"rtn w4 pc sym", "rtn w4 g64 sym"}  # rtn's headline group sizes
    with pytest.raises(ValueError, match="methods: unknown method 'nope'"):
        build_runs(["rtn", "nope"])
    with pytest.raises(ValueError, match="bits must be positive integers, got 0"):
        build_runs(bits=[0])
    with pytest.raises(ValueError, match="group_sizes must be positive integers or -1"):
        build_runs(group_sizes=[-2])


# -- sweeps ------------------------------------------------------------------------------------

def test_a_method_that_raises_is_recorded_as_failed_and_the_rest_complete(tmp_path, tiny_dir, text,
                                                                          exploding_method, quantized):
    runs, _ = build_runs(["test-exploding", "eetq"])
    res = run_compare(tiny_dir, tmp_path / "r", runs, text=text, **KW)
    assert [(r["name"], r["status"]) for r in res["runs"]] == [("fp32", "ok"), ("test-exploding", "failed"),
                                                               ("eetq-int8", "ok")]
    bad = res["runs"][1]
    assert bad["error"] == "RuntimeError: this method always fails" and "_explode" in bad["traceback"]
    assert bad["config"] == ExplodingConfig().to_dict() and bad["timings"]["total_s"] > 0 and "metrics" not in bad
    assert quantized == ["exploding w4", "eetq w8a16 per-channel"]
    quantized.clear()
    run_compare(tiny_dir, tmp_path / "r", runs, text=text, **KW)  # the failed run is tried again, only it
    assert quantized == ["exploding w4"]


def test_calibration_windows_go_to_the_methods_that_use_data(tmp_path, tiny_dir, text, quantized):
    runs = [Run("fp32"), Run("gptq", GPTQConfig(bits=4, group_size=32)), Run("rtn", RTNConfig(bits=4, group_size=32))]
    kw = dict(KW, calib_text=text, calib_seqlen=16, seed=3)
    res = run_compare(tiny_dir, tmp_path / "r", runs, text=text, calib_samples=4, **kw)
    fp, gptq, rtn = res["runs"]
    assert gptq["status"] == "ok" and gptq["calibration"] == {
        "samples": 4, "seqlen": 16, "seed": 3, "text": "user", "text_sha256": gptq["calibration"]["text_sha256"]}
    assert rtn["calibration"] is None and fp["calibration"] is None
    assert res["settings"]["calibration"]["samples"] == 4 and res["settings"]["run_list"] == "custom"
    assert gptq["timings"]["quantize_s"] > 0
    quantized.clear()
    res = run_compare(tiny_dir, tmp_path / "r", runs, text=text, calib_samples=6, **kw)
    assert quantized == ["gptq w4 g32 sym gar"]  # only the run that used the calibration data is redone
    assert res["runs"][1]["calibration"]["samples"] == 6 and res["runs"][2] == rtn


def test_progress_bar_shows_runs_done_and_the_current_layer(tmp_path, tiny_dir, text, capsys):
    run_compare(tiny_dir, tmp_path / "r", [Run("fp32"), Run("w4", RTNConfig(bits=4, group_size=32))], text=text,
                **{**KW, "show_progress": True})
    err = capsys.readouterr().err
    assert "compare:" in err and "2/2" in err and "w4" in err
    assert "model.layers.1.mlp.down_proj" in err  # the layer being quantized


_KILLABLE = """
import sys, time
import polyquant.eval
real = polyquant.eval.evaluate
n = [0]
def stalling(*a, **kw):
    n[0] += 1
    if n[0] == 3:  # the third run hangs: the test kills the process meanwhile
        time.sleep(120)
    return real(*a, **kw)
polyquant.eval.evaluate = stalling
from polyquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_sweep_restarts_without_redoing_finished_runs(tmp_path, tiny_dir, text, quantized, counted):
    tf = tmp_path / "t.txt"
    tf.write_text(text)
    out = tmp_path / "rep"
    args = ["compare", str(tiny_dir), "-o", str(out), "--methods", "rtn", "--seqlen", "16", "--max-windows", "2",
            "--no-speed", "--text", str(tf), "-q"]
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "runs.jsonl").is_file() and len(jsonl(out)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = [r["name"] for r in jsonl(out)]
    assert done == ["fp32", "rtn-w8-pc"]
    assert main(args) == 0
    assert quantized == ["rtn w4 g64 sym", "rtn w4 g64 asym", "rtn w3 g64 sym"]  # the finished ones are not redone
    assert counted[0] == [4, 4, 3]
    recs = results(out)
    assert [r["name"] for r in recs] == ["fp32", "rtn-w8-pc", "rtn-w4-g64-sym", "rtn-w4-g64-asym", "rtn-w3-g64"]
    assert all(r["status"] == "ok" for r in recs) and len(jsonl(out)) == 5


# -- the commands ------------------------------------------------------------------------------

def test_compare_command_runs_every_registered_method_and_writes_the_report(tmp_path, tiny_dir, text, capsys,
                                                                           counted):
    tf = tmp_path / "t.txt"
    tf.write_text(text)
    out = tmp_path / "rep"
    args = ["compare", str(tiny_dir), "-o", str(out), "--seqlen", "16", "--max-windows", "2", "--no-speed",
            "--text", str(tf), "--calib-text", str(tf), "--calib-samples", "4", "--calib-seqlen", "16", "-q"]
    assert main(args) == 0
    stdout, _ = capsys.readouterr()
    recs = results(out)
    no_presets = sorted(m for m, s in METHODS.items() if not s.presets)  # one run at defaults, after the presets
    opt_in = {m for m, s in METHODS.items() if s.presets and not any(p.sweep for p in s.presets)}
    assert [r["name"] for r in recs] == ["fp32"] + [n for n, _, _ in HEADLINE] + no_presets
    assert {r["method"] for r in recs} == {"fp32", *METHODS} - opt_in
    assert all(r["status"] == "ok" for r in recs), [(r["name"], r.get("error")) for r in recs if r["status"] != "ok"]
    assert all(r["config"] is None or r["config"]["quantize_lm_head"] is False for r in recs)
    calibrated = {r["method"] for r in recs if r["calibration"] is not None}
    assert calibrated == {m for m, s in METHODS.items() if s.needs_calibration} - opt_in
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "setting", "ppl"]
    assert f"{len(recs)} runs (0 failed)" in stdout and "report: " in stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["run_list"] == "headline"
    assert {x["method"] for x in payload["skipped"]} == opt_in
    assert payload["settings"]["calibration"]["samples"] == 4
    for f in ("report.html", "summary.md", "matrix.md", "matrix.json", "charts/ppl_vs_bits.svg",
              "charts/ppl_vs_bits.png", "charts/kl_vs_bits.svg", "charts/quantize_time.png"):
        assert (out / f).is_file(), f
    assert "charts/speed_vs_memory.svg" not in {str(p.relative_to(out)) for p in out.rglob("*")}  # --no-speed

    # the report is regenerated from results.json alone: nothing is evaluated or quantized
    for f in ("report.html", "summary.md", "charts/ppl_vs_bits.svg"):
        (out / f).unlink()
    counted[0].clear()
    assert main(["report", str(out)]) == 0
    assert counted[0] == [] and (out / "report.html").is_file() and (out / "charts/ppl_vs_bits.svg").is_file()
    assert "wrote " in capsys.readouterr().out


def test_compare_command_grid_says_what_it_skips(tmp_path, tiny_dir, text, capsys):
    tf = tmp_path / "t.txt"
    tf.write_text(text)
    out = tmp_path / "rep"
    args = ["compare", str(tiny_dir), "-o", str(out), "--methods", "quanto,torchao-int4", "--bits", "3,4",
            "--group-sizes", "32", "--seqlen", "16", "--max-windows", "2", "--no-speed", "--text", str(tf), "-q"]
    assert main(args) == 0
    _, err = capsys.readouterr()
    assert "skipping quanto bits=3: quanto supports bits 2, 4, 8 only" in err
    recs = results(out)
    assert [(r["name"], r["setting"]) for r in recs] == [("fp32", "unquantized"), ("quanto-qint4-g32", "quanto qint4 g32"),
                                                         ("torchao-int4-g32", "torchao int4 g32")]
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["run_list"] == "grid of quanto,torchao-int4"
    assert payload["skipped"] == [{"method": "quanto", "setting": "bits=3", "reason": "quanto supports bits 2, 4, 8 only"}]
    assert "quanto bits=3: quanto supports bits 2, 4, 8 only" in (out / "summary.md").read_text()


def test_compare_and_report_commands_refuse_bad_input(tmp_path, capsys):
    assert main(["compare", "-o", str(tmp_path / "x"), "--methods", "rtn,nope"]) == 2
    assert "methods: unknown method 'nope'" in capsys.readouterr().err
    assert main(["compare", "-o", str(tmp_path / "x"), "--bits", "4,x"]) == 2
    assert "must be comma-separated integers" in capsys.readouterr().err
    assert main(["compare", "-o", str(tmp_path / "x"), "--methods", "eetq", "--bits", "4"]) == 2
    assert "eetq is 8-bit only" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json does not exist" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "no 'runs' list" in capsys.readouterr().err


def test_opt_in_presets_run_when_their_method_is_named():
    from polyquant.methods.traits import Preset
    slow = [sp for sp in METHODS.values() if sp.presets and not any(p.sweep for p in sp.presets)]
    for sp in slow:
        runs, skipped = build_runs([sp.name])
        assert [r.name for r in runs[1:]] == [p.name for p in sp.presets] and skipped == []
    with pytest.raises(ValueError, match="sweep must be a bool"):
        Preset("x", {}, sweep="no")
