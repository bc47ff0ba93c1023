"""Fault injection for streaming quantization (#17): SIGKILL ``polyquant quantize --stream`` at random
moments, rerun the same command until it completes, and check that the output path never holds a
partial checkpoint and that the final files are byte-identical to an uninterrupted run's.

    nice -n 5 taskset -c 1 python benchmarks/fault_inject_stream.py --kills 20 \\
        -- default -m gptq -b 4 -g 64 --calib-samples 8

A kill lands at a uniformly random moment after the run has begun its work (created OUT.partial),
within the uninterrupted run's working time, so it hits reading, quantizing, writing a shard, the
manifest or the final assembly. JSON on stdout and in benchmarks/results/.
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
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _wait_for_partial(p: subprocess.Popen, partial: Path) -> float | None:
    """Wait until the run has created its resume folder (its work begins) or ended; when it began."""
    while p.poll() is None:
        if partial.exists():
            return time.perf_counter()
        time.sleep(0.02)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/pq-fault-inject")
    ap.add_argument("quantize_args", nargs=argparse.REMAINDER, help="after --: MODEL and quantize flags")
    a = ap.parse_args()
    qargs = [x for x in a.quantize_args if x != "--"]
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = [sys.executable, "-m", "polyquant", "quantize", *qargs, "--threads", "1", "--stream", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(base + ["-o", str(work / "ref")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work_start = _wait_for_partial(p, work / "ref.partial")
    if p.wait() != 0:
        raise SystemExit("the uninterrupted run failed")
    ref_s = time.perf_counter() - t0
    work_s = time.perf_counter() - (work_start or t0)  # from the resume folder's creation to the end
    ref = files(work / "ref")
    out = work / "out"
    partial = out.parent / f"{out.name}.partial"
    rng = random.Random(a.seed)
    kills = runs = partial_outputs = units_seen = 0
    events = []
    t_all = time.perf_counter()
    while kills < a.kills:
        runs += 1
        delay = rng.uniform(0.0, work_s)
        p = subprocess.Popen(base + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_partial(p, partial)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        done = None
        if (partial / "manifest.json").is_file():
            try:
                done = json.loads((partial / "manifest.json").read_text())["done"]
            except ValueError:
                done = "unreadable"
        if out.exists():
            complete = files(out) == ref
            partial_outputs += not complete
            events.append({"run": runs, "delay_s": round(delay, 2), "rc": p.returncode, "output": "complete"
                           if complete else "PARTIAL"})
            if p.returncode == 0 or complete:
                shutil.rmtree(out)  # start over: every kill must hit a run in progress
                continue
        events.append({"run": runs, "delay_s": round(delay, 2), "rc": p.returncode, "units_done": done})
        units_seen = max(units_seen, done if isinstance(done, int) else 0)
    final = subprocess.run(base + ["-o", str(out)], env=env, capture_output=True, text=True)
    identical = out.is_dir() and files(out) == ref
    res = {"command": " ".join(base[1:]), "kills": kills, "runs": runs + 1, "uninterrupted_s": round(ref_s, 1), "uninterrupted_work_s": round(work_s, 1),
           "total_s": round(time.perf_counter() - t_all, 1), "final_rc": final.returncode,
           "final_identical_to_uninterrupted": identical, "outputs_found_partial": partial_outputs,
           "partial_left_after_success": partial.exists(), "max_units_done_at_a_kill": units_seen,
           "resumed_line": [ln for ln in final.stderr.splitlines() if "resumed" in ln][-1:], "events": events,
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(res, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fault-inject-stream-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
