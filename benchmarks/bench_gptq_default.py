"""GPTQ on the default model (SmolLM2-135M): quantization wall time, peak RSS, perplexity in and
out of the calibration domain.

    python benchmarks/bench_gptq_default.py --method gptq --bits 4 --group-size 64
    python benchmarks/bench_gptq_default.py --method rtn --bits 4 --group-size 64
    python benchmarks/bench_gptq_default.py --method gptq --calib pydoc --texts pydoc,enwiki --windows 40
    python benchmarks/bench_gptq_default.py --method awq --calib mix --texts pydoc,enwiki

Perplexity (polyquant.evaluate): the first ``--windows`` windows of 512 of each text in
``--texts``: ``pydoc`` is the default text's evaluation slice (its first 90%), ``enwiki`` the
enwiki excerpt's (polyquant.data.enwiki_text; set $POLYQUANT_ENWIKI to the gensim 4.4.0 wheel when
gensim is not installed). Calibration (``--calib``): ``pydoc`` (the pydoc text's calibration slice
only), ``enwiki`` (the excerpt's), or ``mix`` (polyquant's default: half of each); calibration slices
are the last 10% of each text, so no evaluated token is ever calibrated on. ``ppl`` is the first
text's perplexity; ``ppl_by_text`` has all. The GPTQModel peer row: ``peer_gptqmodel.py`` (same
windows, same evaluation). One configuration per process, so peak RSS belongs to it. Writes one
JSON line to --out (appends).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time

import torch

import polyquant
from polyquant.calibration import Calibration, calibration_data
from polyquant.methods import GPTQConfig, RTNConfig


def _cpu() -> float:
    """CPU seconds of this process (user + system): on a shared machine a better measure of the
    work than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn", "fp32"])
    ap.add_argument("--calib", choices=("pydoc", "enwiki", "mix"), default="pydoc",
                    help="calibration windows: pydoc only (the former default), enwiki only, or the default mix")
    ap.add_argument("--texts", default="pydoc", help="comma-separated built-in texts to evaluate on (pydoc,enwiki)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--mse", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows (the #21 protocol: 32 x 512)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights-bf16", action="store_true",
                    help="round the float weights to bfloat16 first (as GPTQModel loads the model on a CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--resume-dir", default=None)
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--gar", action="store_true", help="act_group_aware=True (default: auto, on unless act-order)")
    ap.add_argument("--no-gar", action="store_true", help="reference column order")
    ap.add_argument("--calib-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="calibration forwards: auto (bf16 on CUDA, float32 on CPU), float32, bfloat16")
    ap.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"),
                    help="GPTQ scale_dtype (default: the config's, float16)")
    ap.add_argument("--scale-rounding", choices=("pack", "loop"),
                    help="GPTQ scale_rounding (default: the config's, pack)")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ damp_percent (default: the config's)")
    ap.add_argument("--kernels", default="auto", help="comma-separated kernels to evaluate with")
    ap.add_argument("--save", default=None, help="save the quantized model here (gptq format)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--speed", action="store_true", help="also measure decode / prefill tok/s (at --threads)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(a.threads)
    model, tok = polyquant.load_model("default")
    if a.weights_bf16:  # GPTQModel's CPU load: the float weights rounded to bfloat16 before quantization
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), _cpu()
    cfg = None
    if a.method == "fp32":
        q = model
    elif a.method == "rtn":
        q = polyquant.quantize(model, RTNConfig(bits=a.bits, group_size=a.group_size, sym=not a.asym), inplace=True)
    else:
        if a.method == "awq":
            from polyquant.methods.awq import AWQConfig
            cfg = AWQConfig(bits=a.bits, group_size=a.group_size)  # AWQ's default: zero points (asym)
        else:
            extra = {} if a.damp is None else {"damp_percent": a.damp}
            if a.scale_dtype:
                extra["scale_dtype"] = a.scale_dtype
            if a.scale_rounding:
                extra["scale_rounding"] = a.scale_rounding
            cfg = GPTQConfig(bits=a.bits, group_size=a.group_size, sym=not a.asym, act_order=a.act_order, mse=a.mse,
                             true_sequential=not a.no_true_sequential, static_groups=a.static_groups,
                             act_group_aware=True if a.gar else (False if a.no_gar else None), **extra)
        if a.calib == "mix":
            calib = calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed)
        elif a.calib == "enwiki":
            calib = calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed, mix=("enwiki",))
        else:
            calib = calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed, mix=("pydoc",))
        ac = {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16}[a.calib_dtype]
        run = Calibration(calib, resume_dir=a.resume_dir, autocast=ac)
        q = polyquant.quantize(model, cfg, calibration=run, inplace=True)
    quant_s, quant_cpu = time.perf_counter() - t0, _cpu() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.save:
        polyquant.save(q, a.save, tokenizer=tok, overwrite=True)
    for kernel in a.kernels.split(","):
        if a.method not in ("fp32",):
            polyquant.set_kernels(q, kernel)
        from polyquant import data
        ppl = {}
        for k, name in enumerate(a.texts.split(",")):
            text = None if name == "pydoc" else data.builtin_text(name)
            ev = polyquant.evaluate(q, tok, text=text, holdout=True, seqlen=512, max_windows=a.windows,
                                    measure_speed=a.speed and k == 0, show_progress=False)
            ppl[name] = ev.get("ppl")
            if k == 0:
                ev0 = ev
        ev = ev0
        row = {"method": a.method, "config": cfg.describe() if cfg is not None else a.method, "calib": a.calib,
               "windows": a.windows, "ppl_by_text": ppl, "bits": a.bits, "group_size": a.group_size, "sym": not a.asym,
               "act_order": a.act_order, "gar": bool(getattr(cfg, "group_aware", False)), "calib_dtype": a.calib_dtype, "weights_bf16": a.weights_bf16,
               "calib_autocast": (q.polyquant.extra.get("calibration") or {}).get("autocast") if cfg is not None else None,
               "static_groups": a.static_groups, "mse": a.mse,
               "damp": getattr(cfg, "damp_percent", None), "group_params": getattr(cfg, "group_params", None),
               "scale_dtype": getattr(cfg, "scale_dtype", None), "scale_rounding": getattr(cfg, "scale_rounding", None),
               "true_sequential": not a.no_true_sequential, "n_samples": a.n_samples, "seqlen": a.seqlen, "seed": a.seed,
               "threads": a.threads, "quant_seconds": round(quant_s, 1),
               "quant_cpu_seconds": round(quant_cpu, 1),
               "peak_rss_loaded_mb": round(rss_loaded / 2**20),
               "peak_rss_during_quant_mb": round(rss / 2**20),
               "ppl": ppl[a.texts.split(",")[0]], "kernels": ev.get("kernels", kernel),
               "decode_tok_s": ev.get("decode_tok_s"), "prefill_tok_s": ev.get("prefill_tok_s"),
               "load_avg_1min": round(os.getloadavg()[0], 1)}
        print(json.dumps(row))
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
