"""SpQR against GPTQ on the default model (SmolLM2-135M): perplexity, bits per weight (everything
counted), outlier share, quantization time; decode tok/s with the CPU kernel.

    # accuracy + quantization time, one process, rows in order (heavy: the second core)
    nice -n 5 taskset -c 1 python benchmarks/bench_spqr.py accuracy --n-samples 32 --windows 8 \\
        --save-dir /tmp/spqr-bench --out benchmarks/results/spqr.jsonl
    # decode speed, 1 thread, rows interleaved (timing: under the core-0 lock)
    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_spqr.py speed --save-dir /tmp/spqr-bench

Same protocol as ``bench_gptq_default.py``: calibration ``polyquant.calibration_data(tok, n, 512,
seed 0)`` with exact float32 forwards (the CPU default), perplexity on the first ``--windows``
windows of 512 of the default text. Rows (``--rows``): ``gptq-w4-g64`` and ``gptq-w3-g64`` (GPTQ at
its defaults, sym), ``spqr-w3`` (the README setting: 3-bit, groups of 16, 3-bit statistics in
groups of 16, threshold 0.2, act-order, damp 1.0: about 4 bits per weight counted) and ``spqr-w2``
(2-bit weights, same statistics, threshold ``--w2-threshold``), and any ``spqr-w{bits}[-t{threshold}]
[-g{group_size}]`` (``spqr-w3-t1.0-g64``: 3-bit codes in groups of 64, about 3.3 bits, the ~3-bit row
that beats GPTQ W3 g64). Quantization time is
reported as wall and process-CPU seconds (CPU seconds are the fairer measure on a shared machine)
and as a ratio to GPTQ W4 g64's in the same run. ``bits_per_weight`` is
``QuantizedWeight.nbytes()`` of every quantized layer (codes, packed statistics, permutation,
outliers' CSR) per weight; ``spqr_file_bits`` is the same layers in the transformers SpQR file
(64-bit tile words, 32-bit outlier entries) where the layout holds them.

``speed`` loads the models ``accuracy`` saved (fp32 is the default model) and measures greedy
decode at 1 thread (``_common.measure_decode``, median of runs), rows interleaved round-robin.
Prints one JSON object per row and a side-by-side table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import polyquant  # noqa: E402
from polyquant.calibration import Calibration  # noqa: E402
from polyquant.methods.gptq import GPTQConfig  # noqa: E402
from polyquant.methods.spqr import SpQRConfig  # noqa: E402
from polyquant.nn import QuantLinear  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _configs(w2_threshold: float) -> dict:
    return {"gptq-w4-g64": GPTQConfig(bits=4, group_size=64), "gptq-w3-g64": GPTQConfig(bits=3, group_size=64),
            "spqr-w3": SpQRConfig(bits=3), "spqr-w2": SpQRConfig(bits=2, outlier_threshold=w2_threshold)}


def _size(model) -> dict:
    from polyquant.formats.spqr import check_spqr_hf, spqr_layer_tensors
    qls = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    params = sum(m.quantized_weight.shape[0] * m.quantized_weight.shape[1] for _, m in qls)
    nbytes = sum(m.quantized_weight.nbytes() for _, m in qls)
    nnz = sum(m.quantized_weight.outliers.nnz for _, m in qls if m.quantized_weight.outliers is not None)
    per_layer = {n: round(m.quantized_weight.outliers.fraction, 5) for n, m in qls
                 if m.quantized_weight.outliers is not None}
    file_bits = None
    if qls and all(check_spqr_hf(m.quantized_weight) is None for _, m in qls):
        fb = sum(sum(t.numel() * t.element_size() for t in spqr_layer_tensors(m.quantized_weight).values())
                 for _, m in qls)
        file_bits = round(fb * 8 / params, 4)
    return {"bits_per_weight": round(nbytes * 8 / params, 4), "quantized_bytes": nbytes,
            "outlier_share": round(nnz / params, 6) if per_layer else None, "spqr_file_bits": file_bits,
            "outlier_share_per_layer": per_layer or None}


def accuracy(a) -> None:
    torch.set_num_threads(a.threads)
    model, tok = polyquant.load_model("default")
    calib = C.calibration_windows(tok, a.calib, a.n_samples, a.seqlen, a.seed)
    texts = a.texts.split(",")
    rows = []
    if "fp32" in a.rows:
        ppl = C.ppl_by_text(model, tok, texts, a.windows)
        rows.append({"row": "fp32", "ppl": ppl[texts[0]], "ppl_by_text": ppl, "bits_per_weight": 32.0,
                     "windows": a.windows, "calib": a.calib})
        print(json.dumps(rows[-1]), flush=True)
    cfgs = _configs(a.w2_threshold)
    for name in [r for r in a.rows if r != "fp32"]:
        cfg = cfgs.get(name)
        if cfg is None:  # spqr-w{bits}[-t{threshold}][-g{group_size}]
            opts = {p[0]: p[1:] for p in name.split("-")[1:]}
            cfg = SpQRConfig(bits=int(opts["w"]), **({"outlier_threshold": float(opts["t"])} if "t" in opts else {}),
                             **({"group_size": int(opts["g"])} if "g" in opts else {}))
        if a.include:
            cfg = cfg.replace(include=list(a.include))
        t0, c0 = time.perf_counter(), _cpu()
        q = polyquant.quantize(model, cfg, calibration=Calibration(calib, autocast=None), inplace=False,
                               show_progress=False)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        polyquant.set_kernels(q, "reference" if name.startswith("spqr") else "auto")
        ppl = C.ppl_by_text(q, tok, texts, a.windows)
        row = {"row": name, "config": cfg.describe(), "ppl": ppl[texts[0]], "ppl_by_text": ppl, "calib": a.calib,
               "quant_seconds": round(wall, 1),
               "quant_cpu_seconds": round(cpu, 1), **_size(q), "n_samples": a.n_samples, "seqlen": a.seqlen,
               "windows": a.windows, "threads": a.threads, "include": a.include, "load_avg_1min": round(os.getloadavg()[0], 1)}
        if not a.per_layer:
            row.pop("outlier_share_per_layer")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.save_dir:
            fmt = "spqr" if cfg.method == "spqr" and cfg.bits == 3 else ("polyquant-spqr" if name.startswith("spqr") else "gptq")
            polyquant.save(q, Path(a.save_dir) / name, format=fmt, tokenizer=tok, overwrite=True)
        del q
    by = {r["row"]: r for r in rows}
    g4 = by.get("gptq-w4-g64")
    summary = {}
    for r in rows:
        if g4 and "quant_cpu_seconds" in r:
            r["quant_cpu_vs_gptq_w4"] = round(r["quant_cpu_seconds"] / g4["quant_cpu_seconds"], 2)
    for s in by:
        g = "gptq-w4-g64" if s.startswith("spqr-w3") else ("gptq-w3-g64" if s.startswith("spqr-w2") else None)
        if g in by:
            summary[f"{s}_vs_{g}"] = {
                "bits": [by[s]["bits_per_weight"], by[g]["bits_per_weight"]],
                **{t: {"ppl": [round(by[s]["ppl_by_text"][t], 3), round(by[g]["ppl_by_text"][t], 3)],
                       "below": by[s]["ppl_by_text"][t] < by[g]["ppl_by_text"][t]} for t in texts}}
    print(f"\n{'row':<13} " + " ".join(f"{t:>8}" for t in texts) + f" {'bits/w':>7} {'file b/w':>8} {'outl %':>7} {'quant s':>8} {'cpu s':>7} {'cpu/gptq4':>9}")
    for r in rows:
        f = lambda k, spec: (spec.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        print(f"{r['row']:<13} " + " ".join(f"{r['ppl_by_text'][t]:>8.3f}" for t in texts) + f" {f('bits_per_weight', '{:.3f}'):>7} {f('spqr_file_bits', '{:.3f}'):>8} "
              f"{(format(100 * r['outlier_share'], '.3f') if r.get('outlier_share') is not None else '-'):>7} "
              f"{f('quant_seconds', '{:.1f}'):>8} {f('quant_cpu_seconds', '{:.1f}'):>7} {f('quant_cpu_vs_gptq_w4', '{:.2f}'):>9}")
    print(json.dumps({"summary": summary}))
    if a.out:
        with open(a.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            fh.write(json.dumps({"summary": summary}) + "\n")


def speed(a) -> None:
    from _common import measure_decode, eval_stream
    torch.set_num_threads(1)
    models = {}
    base, tok = polyquant.load_model("default")
    models["fp32"] = base
    for name in a.speed_rows:
        if name == "fp32":
            continue
        m, _ = polyquant.load(Path(a.save_dir) / name, kernel="auto")
        models[name] = m
    prompt = eval_stream(tok)[:32]
    res: dict = {n: [] for n in models}
    cpu: dict = {n: [] for n in models}
    kernels = {}
    for n, m in models.items():
        kernels[n] = sorted({getattr(q, "kernel_name", None) or str(getattr(q, "kernel", "")) for q in m.modules()
                             if isinstance(q, QuantLinear)} or {"fp32"})
        measure_decode(m, prompt, 8, 1, "inference_mode", warmup=False)  # warm-up
    for _ in range(a.rounds):  # interleaved
        for n, m in models.items():
            r = measure_decode(m, prompt, a.tokens, 1, "inference_mode", warmup=False)
            res[n].append(r["decode_tok_s"])
            cpu[n].append(r["decode_tok_s_cpu"])  # thread CPU time: less sensitive to a loaded machine
    out = {}
    for n, v in res.items():
        v = sorted(v)
        c = sorted(cpu[n])
        out[n] = {"decode_tok_s_median": round(v[len(v) // 2], 2), "runs": [round(x, 2) for x in res[n]],
                  "decode_tok_s_cpu_median": round(c[len(c) // 2], 2), "kernels": kernels[n]}
    f = out["fp32"]["decode_tok_s_median"]
    fc = out["fp32"]["decode_tok_s_cpu_median"]
    for n in out:
        out[n]["vs_fp32"] = round(out[n]["decode_tok_s_median"] / f, 3)
        out[n]["vs_fp32_cpu_time"] = round(out[n]["decode_tok_s_cpu_median"] / fc, 3)
        print(json.dumps({"row": n, **out[n], "threads": 1, "tokens": a.tokens}))
    print(f"\n{'row':<13} {'decode tok/s':>12} {'x fp32':>7} {'cpu-time tok/s':>14} {'x fp32':>7}  kernels")
    for n, r in out.items():
        print(f"{n:<13} {r['decode_tok_s_median']:>12.2f} {r['vs_fp32']:>7.3f} {r['decode_tok_s_cpu_median']:>14.2f} "
              f"{r['vs_fp32_cpu_time']:>7.3f}  {','.join(r['kernels'])}")
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps({"speed": out, "threads": 1, "tokens": a.tokens, "rounds": a.rounds}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["accuracy", "speed"])
    ap.add_argument("--rows", nargs="+", default=["fp32", "gptq-w4-g64", "gptq-w3-g64", "spqr-w3", "spqr-w2"])
    ap.add_argument("--speed-rows", nargs="+", default=["fp32", "spqr-w3"])
    ap.add_argument("--w2-threshold", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=32)
    C.add_text_args(ap)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--include", nargs="+", default=None,
                    help="regexes of the Linears to quantize (default: every Linear of the blocks); e.g. "
                         "'model\\.layers\\.[0-3]\\.' for a quick run on the first 4 blocks")
    ap.add_argument("--per-layer", action="store_true", help="outlier share of every layer in each row")
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    accuracy(a) if a.mode == "accuracy" else speed(a)


if __name__ == "__main__":
    main()
