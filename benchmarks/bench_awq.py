"""AWQ vs RTN and GPTQ on the default model (SmolLM2-135M): perplexity and quantization time.

    python benchmarks/bench_awq.py                               # every row, one subprocess each
    python benchmarks/bench_awq.py --rows fp32,rtn-w4,awq-w4 --n-samples 32
    python benchmarks/bench_awq.py --worker awq-w4 --n-samples 32  # one row in this process

Protocol (the GPTQ benchmark's): calibration = ``polyquant.calibration_data(tok, n_samples,
seqlen)`` (random windows from the end of the default text), perplexity = the first ``--windows``
windows of 512 tokens of the default text (``polyquant.evaluate``), W4 and W3 with group size 64
(576 is not a multiple of 128), lm_head kept float. RTN and GPTQ rows are *asymmetric* (integer
zero points, as AWQ), so every row uses the same quantizer family. Each row runs in its own
process (``--threads`` torch threads) so its peak RSS is its own; quantization is timed in wall
seconds and in process CPU seconds (the latter is what a shared machine distorts least). Writes
``bench-results/awq.json`` and prints a table; the check reported: AWQ W4 g64 closes at least
40% of asymmetric RTN's perplexity gap to fp32, AWQ quantization under 10 minutes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS = {
    "fp32": {"method": "fp32"},
    "rtn-w4": {"method": "rtn", "bits": 4},
    "gptq-w4": {"method": "gptq", "bits": 4},
    "awq-w4": {"method": "awq", "bits": 4},
    "rtn-w3": {"method": "rtn", "bits": 3},
    "gptq-w3": {"method": "gptq", "bits": 3},
    "awq-w3": {"method": "awq", "bits": 3},
    "awq-w4-duo": {"method": "awq", "bits": 4, "duo_scaling": True},
    "awq-w4-noclip": {"method": "awq", "bits": 4, "clip": False},
}


def worker(row: str, a: argparse.Namespace) -> dict:
    import resource

    import torch

    import polyquant
    from polyquant.calibration import calibration_data
    from polyquant.methods import GPTQConfig, RTNConfig
    from polyquant.methods.awq import AWQConfig

    torch.set_num_threads(a.threads)
    spec = dict(ROWS[row])
    method = spec.pop("method")
    model, tok = polyquant.load_model("default")
    import os
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = None
    if method == "fp32":
        q = model
    elif method == "rtn":
        cfg = RTNConfig(bits=spec["bits"], group_size=a.group_size, sym=False)
        q = polyquant.quantize(model, cfg, inplace=True, show_progress=False)
    else:
        calib = calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen)
        if method == "gptq":
            cfg = GPTQConfig(bits=spec["bits"], group_size=a.group_size, sym=False)
        else:
            cfg = AWQConfig(group_size=a.group_size, **spec)
        q = polyquant.quantize(model, cfg, calibration=calib, inplace=True, show_progress=False)
    quant_s, quant_cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ev = polyquant.evaluate(q, tok, seqlen=512, max_windows=a.windows, measure_speed=False, show_progress=False)
    from polyquant.nn.quantize import kernel_summary
    return {"row": row, "method": method, "config": cfg.describe() if cfg is not None else "fp32",
            "bits": spec.get("bits"), "group_size": a.group_size if cfg is not None else None,
            "n_samples": a.n_samples if method in ("gptq", "awq") else None, "seqlen": a.seqlen,
            "threads": a.threads, "quant_seconds": round(quant_s, 1), "quant_cpu_seconds": round(quant_cpu, 1),
            "loadavg_quant": [round(load0, 1), round(load1, 1)], "peak_rss_mb": round(rss / 2**20),
            "ppl": ev.get("ppl"), "windows": ev.get("windows"), "kernels": kernel_summary(q),
            "calib_autocast": (getattr(q, "polyquant", None) and q.polyquant.extra.get("calibration") or {}).get("autocast")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="fp32,rtn-w4,gptq-w4,awq-w4,rtn-w3,gptq-w3,awq-w3",
                    help=f"comma-separated rows from {', '.join(ROWS)}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "awq.json"))
    ap.add_argument("--previous", default=None,
                    help="an earlier awq.json: its rows not listed in --rows are kept (marked 'reused')")
    a = ap.parse_args()
    if a.worker:
        logging.basicConfig(level=logging.WARNING)
        from _common import emit
        emit(worker(a.worker, a))
        return
    from _common import run_worker
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = []
    if a.previous:
        old = json.loads(Path(a.previous).read_text())
        results = [dict(r, reused=a.previous) for r in old.get("rows", []) if r.get("row") not in rows]
    common = ["--group-size", str(a.group_size), "--n-samples", str(a.n_samples), "--seqlen", str(a.seqlen),
              "--windows", str(a.windows), "--threads", str(a.threads)]
    for r in rows:
        res = run_worker(sys.executable, Path(__file__), ["--worker", r, *common], a.threads, a.timeout)
        res.setdefault("row", r)
        results.append(res)
        print(json.dumps(res), flush=True)
    by = {r["row"]: r for r in results if "ppl" in r}
    checks = {}
    fp, rtn, awq = by.get("fp32"), by.get("rtn-w4"), by.get("awq-w4")
    if fp and rtn and awq:
        gap = rtn["ppl"] - fp["ppl"]
        closed = (rtn["ppl"] - awq["ppl"]) / gap if gap > 0 else float("nan")
        checks["awq_w4_gap_closed_vs_asym_rtn"] = round(closed, 3)
        checks["awq_w4_gap_closed_ge_40pct"] = bool(closed >= 0.4)
    if awq:
        checks["awq_w4_quant_under_600s"] = bool(awq["quant_seconds"] < 600)
    print()
    print(f"{'row':<16}{'config':<28}{'ppl':>9}{'quant s':>10}{'cpu s':>9}{'rss MB':>9}")
    for r in results:
        if "ppl" in r:
            print(f"{r['row']:<16}{r['config']:<28}{r['ppl']:>9.3f}{r['quant_seconds']:>10.1f}"
                  f"{r.get('quant_cpu_seconds', float('nan')):>9.1f}{r['peak_rss_mb']:>9}")
        else:
            print(f"{r['row']:<16}error: {r.get('error')}")
    print(json.dumps(checks))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": results, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
