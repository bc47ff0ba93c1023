"""``compare``: one record per run written as it finishes, resume without redoing finished runs,
failed runs recorded while the sweep goes on, the reference-logit cache, the summary table."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from helpers import tiny_llama, tiny_tokenizer_dir

import polyquant
import polyquant.eval
from polyquant.cli import main
from polyquant.methods import RTNConfig
from polyquant.report.compare import SUMMARY_HEADERS, CachedReference, Run, run_compare, summary_rows
from polyquant.report.store import ResultsStore


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama(seed=2).save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer_dir(d)
    return d


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(1)
    return " ".join(f"w{rng.randrange(250)}" for _ in range(1000))


@pytest.fixture
def counted(monkeypatch):
    """Count (and optionally sabotage) evaluate() calls made by compare."""
    real = polyquant.eval.evaluate
    calls: list[str] = []
    state = {"fail": None}

    def wrapper(model, tok, **kw):
        rec = getattr(model, "polyquant", None)
        label = rec.config["bits"] if rec is not None else "fp"
        calls.append(label)
        if state["fail"] is not None:
            state["fail"](label, len(calls))
        return real(model, tok, **kw)

    monkeypatch.setattr(polyquant.eval, "evaluate", wrapper)
    return calls, state


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
    assert w8["kernel"] == {"cpu-int8": 14} and w4["kernel"] == {"cpu-int4": 14}

    # rerun: nothing finished is redone; the failed run is tried again (and fails again)
    calls.clear()
    run_compare(tiny_dir, out, sweep(), text=text, **KW)
    assert calls == []
    assert [r["status"] for r in results(out)] == ["ok", "ok", "ok", "failed"]
    assert len(jsonl(out)) == 5
    assert results(out)[:3] == recs[:3]

    # other settings are other runs
    run_compare(tiny_dir, out, sweep()[:2], text=text, **{**KW, "max_windows": 1})
    assert calls == ["fp", 8]
    assert [r["settings"]["max_windows"] for r in results(out)] == [1, 1]


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
    calls, _ = counted
    runs = [Run("fp32"), Run("w3", RTNConfig(bits=3, group_size=32))]  # 3 bits: only the reference kernel
    res = run_compare(tiny_dir, tmp_path / "r", runs, text=text, seqlen=16, max_windows=2, threads=1, eval_threads=2,
                      decode_tokens=16, show_progress=False)
    fp, w3 = res["runs"]
    assert calls == ["fp", "fp", 3, 3]  # an accuracy pass and a speed pass each
    assert w3["kernel"] == {"reference": 14}
    assert fp["metrics"]["decode_tokens"] == 16 and w3["metrics"]["decode_tokens"] == 8 and "notes" in w3
    for r in (fp, w3):
        m = r["metrics"]
        assert (m["threads"], m["eval_threads"], m["windows"]) == (1, 2, 2) and m["decode_tok_s"] > 0
    assert w3["metrics"]["kl"] > 0


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


def test_compare_command_runs_the_default_sweep(tmp_path, tiny_dir, text, capsys):
    tf = tmp_path / "t.txt"
    tf.write_text(text)
    out = tmp_path / "rep"
    args = ["compare", str(tiny_dir), "-o", str(out), "--seqlen", "16", "--max-windows", "2", "--no-speed",
            "--text", str(tf), "-q"]
    assert main(args) == 0
    stdout, _ = capsys.readouterr()
    recs = results(out)
    assert [r["name"] for r in recs] == ["fp32", "rtn-w8-pc", "rtn-w4-pc", "rtn-w4-g64-sym", "rtn-w4-g64-asym",
                                         "rtn-w3-g64"]
    assert all(r["status"] == "ok" for r in recs)
    assert all(r["config"] is None or r["config"]["quantize_lm_head"] is False for r in recs)
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "setting", "ppl"]
    assert sum(1 for ln in lines if ln.startswith("rtn ")) == 5 and "6 runs (0 failed)" in stdout
