"""Decode speed of GPTQ W4 g64 with act-order (issue 3's last target: >= 1.8x fp32 on CPU).

Default model (SmolLM2-135M), 1 thread, batch 1, greedy decode of 64 new tokens after a
32-token prompt with a KV cache (``_common.measure_decode``), the lm_head left in float. All rows
live in one process and their decode runs are taken round-robin (``--rounds`` rounds), so a load
change on a shared machine hits every row alike. Reported per row: wall-clock median / best tok/s
and thread-CPU-time median tok/s, and the ratios to fp32 on both.

Rows (``-fast``: the runtime options of ``bench_rtn.py``'s ``-fast`` rows, ``FAST_RUNTIME``:
q/k/v and gate/up fused into one packed matmul, the float lm_head computed in bf16):

- ``fp32``: the float model;
- ``rtn-w4-g64[-fast]``: RTN W4 g64 sym (``cpu-int4``);
- ``gptq-w4-g64[-fast]``: GPTQ W4 g64 sym, group-aware column order (no ``g_idx``: ``cpu-int4``);
- ``gptq-w4-g64-ao[-fast]``: GPTQ W4 g64 sym act-order (``desc_act``: ``g_idx``,
  ``cpu-int4-actorder``); fused, the q/k/v and gate/up siblings share one gather (equal ``g_idx``);
- ``rtn-w4-g64-int4``, ``gptq-w4-g64-ao-int4[-fast]`` (not run by default): the same weights on
  ``cpu-int4`` / ``cpu-int4-actorder`` (PyTorch's packed bf16 op) instead of auto's ``cpu-lut4``;
- ``gptq-w4-g64-ao-prev[-fast]`` (not run by default): the same checkpoint with the act-order
  kernel's previous forward (gather on the 3-D input, then ``cpu-int4``) and, for ``-fast``, only
  the bf16 head (act-order layers did not fuse then): the state before, for comparison.

Calibration: decode speed does not depend on the calibration data (it only changes the values of
the codes, scales and permutation, not their shapes or the work per token), so the GPTQ rows are
calibrated on a small set, 8 x 512 tokens by default (``--calib-samples``, ``--calib-seqlen``).
GPTQ rows are measured as *checkpoints*: ``--prepare`` quantizes them and saves them in the
``gptq`` format under ``--ckpt-dir``; the timing run loads them with ``polyquant.load`` (as a user
would) and quantizes any that are missing in-process. Run the preparation apart from the timing:

    taskset -c 1 python benchmarks/bench_actorder_decode.py --prepare
    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_actorder_decode.py --rounds 7

Writes ``bench-results/actorder_decode.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FAST_RUNTIME = "fuse+bf16-head"  # as bench_rtn.FAST_RUNTIME
ROWS = ("fp32", "rtn-w4-g64", "rtn-w4-g64-fast", "gptq-w4-g64", "gptq-w4-g64-fast", "gptq-w4-g64-ao",
        "gptq-w4-g64-ao-fast", "gptq-w4-g64-ao-prev", "gptq-w4-g64-ao-prev-fast",
        "rtn-w4-g64-int4", "gptq-w4-g64-ao-int4", "gptq-w4-g64-ao-int4-fast")
DEFAULT_ROWS = ROWS[:7]
#: the ``-prev`` rows: act-order as it ran before the fused act-order runtime (the gather on the
#: 3-D input, then cpu-int4's forward; no fusion: only the bf16 head for ``-fast``), for a
#: before/after comparison in the same process
PREV_RUNTIME = "bf16-head"
TARGET = 1.8


def _base(row: str) -> str:
    row = row[:-len("-fast")] if row.endswith("-fast") else row
    row = row[:-len("-int4")] if row.endswith("-int4") else row
    return row[:-len("-prev")] if row.endswith("-prev") else row


def _use_previous_actorder_forward(model) -> int:
    """Run the model's act-order layers with the kernel's forward as it was before (comparison)."""
    from polyquant.kernels.cpu_actorder import CpuInt4ActOrderKernel
    from polyquant.nn import QuantLinear

    class Previous(CpuInt4ActOrderKernel):
        def forward(self, module, x):
            return self._int4.forward(module, x.index_select(-1, module._buffers["k_perm"]))

    prev, n = Previous(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel_name == "cpu-int4-actorder":
            m.kernel = prev
            n += 1
    return n


def _ckpt(args, base: str) -> Path:
    return Path(args.ckpt_dir) / f"{base}-c{args.calib_samples}x{args.calib_seqlen}"


def _gptq(base: str, args, model, tok):
    import polyquant
    from polyquant.calibration import calibration_data
    from polyquant.methods import GPTQConfig
    cfg = GPTQConfig(bits=4, group_size=64, sym=True, act_order=base.endswith("-ao"))
    calib = calibration_data(tok, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=0)
    return polyquant.quantize(model, cfg, calibration=calib, inplace=True, show_progress=False)


def prepare(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    import polyquant
    for base in sorted({_base(r) for r in args.rows if r.startswith("gptq")}):
        out = _ckpt(args, base)
        if out.exists() and not args.force:
            print(f"{out} exists")
            continue
        model, tok = polyquant.load_model("default")
        t0 = time.perf_counter()
        q = _gptq(base, args, model, tok)
        print(f"{base}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
        polyquant.save(q, out, format="gptq", tokenizer=tok, overwrite=True)
        print(f"saved {out}", flush=True)


def build(row: str, args) -> tuple[Any, Any, dict[str, Any]]:
    """The model of ``row``, its tokenizer, and what it runs (kernels, runtime options, source)."""
    import torch
    import polyquant
    from polyquant.nn.quantize import kernel_summary
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_rtn import _apply_runtime
    base = _base(row)
    info: dict[str, Any] = {}
    if base == "fp32":
        model, tok = polyquant.load_model("default")
        info["kernel"] = "dense fp32"
    elif base == "rtn-w4-g64":
        from polyquant.methods.rtn import RTNConfig
        model, tok = polyquant.load_model("default")
        model = polyquant.quantize(model, RTNConfig(bits=4, group_size=64, sym=True), inplace=True,
                                   show_progress=False)
        info["source"] = "quantized in-process"
    else:
        path = _ckpt(args, base)
        if path.exists():
            model, tok = polyquant.load(path)
            info["source"] = f"checkpoint {path}"
        else:
            model, tok = polyquant.load_model("default")
            model = _gptq(base, args, model, tok)
            info["source"] = f"quantized in-process ({args.calib_samples} x {args.calib_seqlen})"
    model.eval()
    if "-int4" in row:  # PyTorch's packed bf16 int4 op instead of auto's choice (cpu-lut4 on AVX-512 CPUs)
        polyquant.set_kernels(model, "cpu-int4-actorder" if "-ao" in row else "cpu-int4")
    if base != "fp32":
        info["kernel"] = ",".join(f"{k}:{v}" for k, v in kernel_summary(model).items())
    prev = "-prev" in row
    if prev:
        info["previous_actorder_forward"] = _use_previous_actorder_forward(model)
    if row.endswith("-fast"):
        info["runtime_options"] = PREV_RUNTIME if prev else FAST_RUNTIME
        info.update(_apply_runtime(model, info["runtime_options"]))
        info["kernel_after_runtime"] = ",".join(f"{k}:{v}" for k, v in kernel_summary(model).items())
    torch.set_num_threads(args.threads)
    return model, tok, info


def timing(args) -> dict[str, Any]:
    import torch
    torch.set_num_threads(args.threads)
    models, infos, tok = {}, {}, None
    for r in args.rows:
        models[r], tok, infos[r] = build(r, args)
        print(f"built {r}: {infos[r]}", flush=True)
    prompt = C.eval_stream(tok)[:C.PROMPT_TOKENS]
    for r in args.rows:  # warm-up
        C.measure_decode(models[r], prompt, min(8, args.decode_tokens), 1, "inference_mode")
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in args.rows}
    for k in range(args.rounds):
        for r in args.rows:
            runs[r].append(C.measure_decode(models[r], prompt, args.decode_tokens, 1, "inference_mode", warmup=False))
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(
            f"{r} {runs[r][-1]['decode_tok_s']:.1f}" for r in args.rows), flush=True)
    out: dict[str, dict[str, Any]] = {}
    for r, rr in runs.items():
        walls = [x["decode_tok_s"] for x in rr]
        cpus = [x["decode_tok_s_cpu"] for x in rr]
        out[r] = {"row": r, "decode_tok_s": statistics.median(walls), "decode_tok_s_best": max(walls),
                  "decode_tok_s_cpu": statistics.median(cpus), "decode_runs_tok_s": [round(w, 2) for w in walls],
                  "decode_runs_tok_s_cpu": [round(c, 2) for c in cpus],
                  "loadavg": [x["loadavg_decode"][0] for x in rr],
                  "first_tokens": rr[-1]["decode_first_tokens"], **infos[r]}
    if "fp32" in out:
        f = out["fp32"]
        for r in out.values():
            r["x_fp32_wall"] = r["decode_tok_s"] / f["decode_tok_s"]
            r["x_fp32_cpu"] = r["decode_tok_s_cpu"] / f["decode_tok_s_cpu"]
            # per round ratios (same round: the same load), their median
            r["x_fp32_wall_per_round_median"] = statistics.median(
                a / b for a, b in zip(r["decode_runs_tok_s"], f["decode_runs_tok_s"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one timed decode per row each)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ckpt-dir", default=str(C.ROOT / "bench-results" / "actorder-ckpt"))
    ap.add_argument("--prepare", action="store_true", help="quantize and save the GPTQ rows' checkpoints, no timing")
    ap.add_argument("--force", action="store_true", help="with --prepare: redo existing checkpoints")
    ap.add_argument("--out", default=str(C.ROOT / "bench-results" / "actorder_decode.json"))
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; known: {', '.join(ROWS)}")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, str(args.threads))
    if args.prepare:
        prepare(args)
        return 0
    import torch
    env = {"cpu": platform.processor(), "nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "threads": args.threads, "decode_tokens": args.decode_tokens, "prompt_tokens": C.PROMPT_TOKENS,
           "rounds": args.rounds, "calibration": f"{args.calib_samples} x {args.calib_seqlen} (speed only)",
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    res = timing(args)
    print(f"\n{'row':22s} {'tok/s':>7s} {'best':>7s} {'cpu':>7s} {'x fp32':>7s} {'x cpu':>7s}  kernel")
    for r in res.values():
        print(f"{r['row']:22s} {r['decode_tok_s']:7.2f} {r['decode_tok_s_best']:7.2f} {r['decode_tok_s_cpu']:7.2f} "
              f"{r.get('x_fp32_wall', float('nan')):7.3f} {r.get('x_fp32_cpu', float('nan')):7.3f}  "
              f"{r.get('kernel_after_runtime', r.get('kernel'))}")
    checks = []
    for r in res.values():
        if r["row"].startswith("gptq") and "x_fp32_wall" in r:
            ok = min(r["x_fp32_wall"], r["x_fp32_cpu"]) >= TARGET
            checks.append({"row": r["row"], "check": f"decode >= {TARGET}x fp32 (wall and thread-CPU)",
                           "wall": round(r["x_fp32_wall"], 3), "cpu": round(r["x_fp32_cpu"], 3), "pass": ok})
            print(f"{'PASS' if ok else 'FAIL'}  {r['row']:22s} wall {r['x_fp32_wall']:.3f}x, "
                  f"thread-CPU {r['x_fp32_cpu']:.3f}x")
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "target": TARGET, "rows": list(res.values()), "checks": checks}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
