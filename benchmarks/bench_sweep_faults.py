"""Crash safety and Ray execution of ``polyquant compare`` sweeps (#17).

Stage ``faults``: SIGKILL a small ``compare`` sweep (``run_compare`` as the command
calls it, without the report files written afterwards) at random moments (uniform between the start
of the process and the end an uninterrupted run of the same sweep took), rerun the same command
after each kill; when a sweep completes, check that its store holds each run exactly once (one
``ok`` record per key, torn lines ignored) and that its records equal an uninterrupted run's
(timings aside), then start the next sweep in a new folder, until ``--kills`` kills have landed.

Stage ``ray``: a local Ray cluster (``ray.init(num_cpus=2)``) runs the same 6-run sweep as the
local executor (same records, timings aside); then a ``compare --executor ray`` driver is
SIGKILLed once two records are in its store, and the rerun resumes (reusing them).

    nice -n 5 taskset -c 1 python benchmarks/bench_sweep_faults.py --kills 20
    nice -n 5 taskset -c 1 python benchmarks/bench_sweep_faults.py --stage ray

JSON on stdout and in benchmarks/results/sweep-faults-<stage>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VOLATILE = {"timings", "started", "finished", "executor", "host", "versions"}
VOLATILE_METRICS = {"eval_seconds", "total_seconds", "speed_seconds", "peak_rss_bytes", "runtime_bytes"}


# The sweep as `polyquant compare` runs it (run_compare with the CLI's run list), without the
# report files the command writes afterwards (minutes of charts and matrices on a loaded CPU that
# a kill would mostly land in, and that a rerun rewrites whole anyway).
_CHILD = """
import json, sys
from polyquant.report.compare import build_runs, run_compare
a = json.loads(sys.argv[1])
runs, skipped = build_runs(a["methods"].split(","))
res = run_compare(a["model"], a["out"], runs, seqlen=a["seqlen"], max_windows=a["max_windows"], measure_speed=False,
                  show_progress=False, skipped=skipped, executor=a.get("executor"))
sys.exit(0 if all(r["status"] == "ok" for r in res["runs"]) else 1)
"""


def sweep_args(out: Path, a) -> dict:
    return {"model": a.model, "out": str(out), "methods": a.methods, "max_windows": a.max_windows,
            "seqlen": a.seqlen}


def polyquant(args: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)


def store_lines(out: Path) -> tuple[int, list[dict]]:
    p = out / "runs.jsonl"
    raw = [x for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
    recs = []
    for x in raw:
        try:
            recs.append(json.loads(x))
        except ValueError:
            pass
    return len(raw), recs


def stable(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k not in VOLATILE}
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in VOLATILE_METRICS}
    return out


def check_sweep(out: Path, reference: list[dict]) -> dict:
    res = json.loads((out / "results.json").read_text())
    raw, recs = store_lines(out)
    oks = [r["key"] for r in recs if r.get("status") == "ok"]
    same = [stable(a) == stable(b) for a, b in zip(reference, res["runs"])]
    return {"runs": len(res["runs"]), "all_ok": all(r["status"] == "ok" for r in res["runs"]),
            "ok_records": len(oks), "distinct_keys": len(set(oks)),
            "each_run_exactly_once": sorted(oks) == sorted(r["key"] for r in res["runs"]),
            "torn_lines": raw - len(recs), "failed_records": sum(r.get("status") != "ok" for r in recs),
            "same_records_as_uninterrupted": len(same) == len(reference) and all(same),
            "invocations": len(res.get("invocations", []))}


def stage_faults(a, work: Path) -> dict:
    ref = work / "reference"
    t0 = time.perf_counter()
    p = polyquant(sweep_args(ref, a))
    assert p.wait() == 0, "the uninterrupted sweep failed"
    t_full = time.perf_counter() - t0
    reference = json.loads((ref / "results.json").read_text())["runs"]
    rng = random.Random(a.seed)
    kills, sweeps, attempts, n = 0, [], 0, 0
    out, kills_this = work / "sweep-0", 0
    t_begin = time.perf_counter()
    while kills < a.kills and time.perf_counter() - t_begin < a.budget_s:
        attempts += 1
        delay = rng.uniform(0, t_full)
        t0 = time.perf_counter()
        p = polyquant(sweep_args(out, a))
        try:
            rc = p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        elapsed = time.perf_counter() - t0
        if rc == -signal.SIGKILL:
            kills += 1
            kills_this += 1
            recs = store_lines(out)[1]
            oks = [r["key"] for r in recs if r.get("status") == "ok"]
            assert len(oks) == len(set(oks)), f"a run counted twice in {out}"
            print(f"kill {kills} after {elapsed:.1f} s: {len(oks)} runs in the store", file=sys.stderr)
            continue
        assert rc == 0, f"sweep exited {rc}"
        sweeps.append({"folder": out.name, "kills": kills_this, **check_sweep(out, reference)})
        print(f"sweep {out.name} completed after {kills_this} kills: {sweeps[-1]}", file=sys.stderr)
        n += 1
        out, kills_this = work / f"sweep-{n}", 0
    # finish the last sweep without kills
    p = polyquant(sweep_args(out, a))
    assert p.wait() == 0
    sweeps.append({"folder": out.name, "kills": kills_this, **check_sweep(out, reference)})
    return {"stage": "faults", "kills": kills, "kills_asked": a.kills, "process_starts": attempts + 1, "uninterrupted_s": t_full,
            "sweeps": sweeps, "runs_per_sweep": len(reference),
            "every_rerun_completed": all(s["all_ok"] for s in sweeps),
            "each_run_exactly_once": all(s["each_run_exactly_once"] for s in sweeps),
            "same_records_as_uninterrupted": all(s["same_records_as_uninterrupted"] for s in sweeps),
            "torn_lines_total": sum(s["torn_lines"] for s in sweeps)}


def _descendants(pid: int) -> list[int]:
    import psutil
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stage_ray(a, work: Path) -> dict:
    import ray

    from polyquant.report.compare import build_runs, run_compare
    runs, _ = build_runs(a.methods.split(","))
    kw = dict(seqlen=a.seqlen, max_windows=a.max_windows, measure_speed=False, show_progress=False)
    t0 = time.perf_counter()
    local = run_compare(a.model, work / "local", runs, **kw)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        viaray = run_compare(a.model, work / "ray", runs, executor="ray", **kw)
        t_ray = time.perf_counter() - t0
    finally:
        ray.shutdown()
    same = [stable(x) == stable(y) for x, y in zip(local["runs"], viaray["runs"])]
    metric_pairs = [{"name": x["name"], "ppl_local": x["metrics"]["ppl"], "ppl_ray": y["metrics"]["ppl"],
                     "kl_local": x["metrics"]["kl"], "kl_ray": y["metrics"]["kl"]}
                    for x, y in zip(local["runs"], viaray["runs"])]

    # the driver killed mid-sweep, then rerun
    out = work / "ray-killed"
    args = {**sweep_args(out, a), "executor": "ray"}
    p = polyquant(args)
    seen: set[int] = set()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and p.poll() is None and len(store_lines(out)[1]) < 2:
        seen.update(_descendants(p.pid))
        time.sleep(0.2)
    seen.update(_descendants(p.pid))
    assert p.poll() is None, "the Ray sweep ended before it could be killed"
    before_kill = len(store_lines(out)[1])
    p.kill()
    p.wait()
    time.sleep(10)
    import psutil
    lingering = [pid for pid in seen if psutil.pid_exists(pid)]
    for pid in lingering:  # the cluster the killed driver started (ours, by pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t0 = time.perf_counter()
    rc = polyquant(args).wait()
    t_rerun = time.perf_counter() - t0
    check = check_sweep(out, local["runs"])
    inv = json.loads((out / "results.json").read_text())["invocations"]
    return {"stage": "ray", "runs": len(runs), "local_s": t_local, "ray_init_s": t_init, "ray_sweep_s": t_ray,
            "same_records_as_local": all(same) and len(same) == len(runs), "metrics": metric_pairs,
            "killed_driver": {"records_before_kill": before_kill, "cluster_processes_left_after_kill": len(lingering),
                              "rerun_exit": rc, "rerun_s": t_rerun, "reused_on_rerun": inv[-1]["reused"], **check}}


def tiny_model(folder: Path) -> str:
    """A random-weight Llama (hidden 128, 4 layers, vocab 256) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"[UNK]": 250, "<s>": 251, "</s>": 252})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))
    return str(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("faults", "ray"), default="faults")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--model", default="default", help="default, a model folder, or tiny (a random 4-layer "
                                                        "Llama made in the work folder)")
    ap.add_argument("--methods", default="rtn,hqq", help="default rtn,hqq: fp32 + 4 RTN presets + HQQ = 6 runs")
    ap.add_argument("--max-windows", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop killing after this many seconds (the kills that landed are reported)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="polyquant-sweep-faults-"))
    label = a.model
    try:
        if a.model == "tiny":
            a.model = tiny_model(work / "tiny-llama")
        t0 = time.perf_counter()
        res = stage_faults(a, work) if a.stage == "faults" else stage_ray(a, work)
        res.update(model=label, methods=a.methods, max_windows=a.max_windows, seqlen=a.seqlen,
                   wall_s=time.perf_counter() - t0, load_avg=os.getloadavg(), date=str(date.today()))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep-faults-{a.stage}-{date.today()}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
