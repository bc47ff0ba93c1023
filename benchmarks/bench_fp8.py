"""Benchmark (issue 5): the FP8 methods on the default model (SmolLM2-135M), 1 thread, batch 1, CPU.

Rows: ``fp32``; ``fbgemm-fp8`` (per-channel e4m3 weights, per-token fp8 activations, ub 1200);
``fp8-block`` (128 x 128 weight blocks, partial at 576; 1 x 128 activation groups);
``ct-fp8-dynamic`` (compressed-tensors FP8_DYNAMIC: W8A8, per-token dynamic activations);
``ct-fp8-weight-only`` (per-channel e4m3 weights, float activations); ``ct-fp8-static``
(compressed-tensors FP8: per-tensor weights, static per-tensor activation scales from 32 x 512
calibration tokens). The lm_head stays float.

Each row runs in its own subprocess and reports perplexity (first 40 windows of 512 tokens of the
default pydoc text, ``polyquant.eval.evaluate``), stored weight bytes and resident bytes (the CPU
emulation keeps an fp32 copy of each weight), quantization seconds, decode tok/s (greedy, KV cache,
32-token prompt; wall median and thread-CPU median) and the ratios to fp32. On CPU there is no fp8
arithmetic: ``fp8-emulated`` quantizes activations exactly as the GPU kernels do and multiplies in
fp32, so decode speed measures the emulation overhead, not fp8 hardware.

    python benchmarks/bench_fp8.py                   # all rows (about 15-25 min on a quiet core)
    python benchmarks/bench_fp8.py --configs fp32,fbgemm-fp8 --decode-tokens 32 --runs 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fbgemm-fp8": {"method": "fbgemm-fp8"},
    "fp8-block": {"method": "fp8-block"},
    "ct-fp8-dynamic": {"preset": "FP8_DYNAMIC"},
    "ct-fp8-weight-only": {"preset": "FP8_WEIGHT_ONLY"},
    "ct-fp8-static": {"preset": "FP8", "calib": True},
}
TARGET_PPL_REL = 0.01


def worker(name: str, seqlen: int, windows: int, decode_tokens: int, runs: int) -> None:
    import torch

    import polyquant
    from polyquant.eval import memory
    from polyquant.methods import get_method
    from polyquant.methods.fp8 import fp8_preset
    from polyquant.nn.quantize import kernel_summary

    torch.set_num_threads(1)
    spec = CONFIGS[name]
    model, tok = polyquant.load_model("default")
    res: dict[str, Any] = {"name": name}
    t0 = time.perf_counter()
    if spec:
        cfg = fp8_preset(spec["preset"]) if "preset" in spec else get_method(spec["method"]).config_cls()
        calib = polyquant.calibration_data(tok, n_samples=32, seqlen=512) if spec.get("calib") else None
        model = polyquant.quantize(model, cfg, calibration=calib, inplace=True, show_progress=False)
        res.update(method=cfg.method, config=cfg.describe(), kernels=kernel_summary(model))
    res["quant_seconds"] = time.perf_counter() - t0
    res.update(C.measure_ppl(model, tok, seqlen, windows, "inference_mode"))
    res["weight_bytes"] = memory.weight_bytes(model)
    res["runtime_bytes"] = memory.runtime_bytes(model)
    stream = C.eval_stream(tok)
    res.update(C.measure_decode(model, stream[:C.PROMPT_TOKENS], decode_tokens, runs, "inference_mode"))
    res["peak_rss_bytes"] = C.peak_rss_bytes()
    C.emit(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(C.ROOT / "bench-results" / "fp8.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.seqlen, a.windows, a.decode_tokens, a.runs)
        return 0
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    rows = []
    for n in names:
        r = C.run_worker(sys.executable, Path(__file__), ["--worker", n, "--seqlen", str(a.seqlen), "--windows",
                                                          str(a.windows), "--decode-tokens", str(a.decode_tokens),
                                                          "--runs", str(a.runs)], 1, a.timeout)
        r.setdefault("name", n)
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["name"] == "fp32" and "ppl" in r), None)
    if base:
        for r in rows:
            if "ppl" in r:
                r["ppl_rel"] = r["ppl"] / base["ppl"] - 1
                r["ppl_within_target"] = r["ppl_rel"] <= TARGET_PPL_REL
                r["bytes_x_fp32"] = r["weight_bytes"] / base["weight_bytes"]
                r["decode_x_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
                r["decode_cpu_x_fp32"] = r["decode_tok_s_cpu"] / base["decode_tok_s_cpu"]
    print(f"\n{'row':20s} {'ppl':>7s} {'rel':>7s} {'MB':>7s} {'resident':>9s} {'tok/s':>6s} {'cpu tok/s':>9s} "
          f"{'x fp32':>7s}")
    for r in rows:
        if "ppl" not in r:
            print(f"{r['name']:20s} error: {r.get('error')}")
            continue
        print(f"{r['name']:20s} {r['ppl']:7.3f} {r.get('ppl_rel', 0):+7.2%} {r['weight_bytes'] / 1e6:7.1f} "
              f"{r['runtime_bytes'] / 1e6:9.1f} {r['decode_tok_s']:6.2f} {r['decode_tok_s_cpu']:9.2f} "
              f"{r.get('decode_cpu_x_fp32', 1):7.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                               "loadavg": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
