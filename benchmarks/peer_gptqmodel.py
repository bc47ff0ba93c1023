"""Peer row for the GPTQ benchmark: GPTQModel 7.6 quantizing the default model on this CPU with the
same calibration windows polyquant uses (``polyquant.calibration_data``, seed 0), then evaluated by
polyquant's perplexity protocol after loading the checkpoint it wrote (polyquant reads GPTQModel
checkpoints). Run it with the GPTQModel virtualenv (it must not share polyquant's environment:
GPTQModel 7.7 pulls a CUDA torch; 7.6 keeps torch 2.13 when pinned with it):

    python -m venv --system-site-packages .venv-gptqmodel
    .venv-gptqmodel/bin/pip install gptqmodel==7.6.0 torch==2.13.0
    GPTQMODEL_CPU_WORKERS=1 .venv-gptqmodel/bin/python benchmarks/peer_gptqmodel.py --bits 4 --group-size 64

Prints one JSON line (quantization wall / CPU seconds, peak RSS, ppl) and appends it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows (the #21 protocol: 32 x 512)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="calibration windows' seed (polyquant.calibration_data)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib", choices=("pydoc", "mix"), default="pydoc",
                    help="calibration windows: the pydoc text's calibration slice, or polyquant's default mix")
    ap.add_argument("--texts", default="pydoc", help="comma-separated built-in texts to evaluate on (pydoc,enwiki)")
    ap.add_argument("--save", help="keep GPTQModel's checkpoint in this folder (default: a temporary one)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the dtype GPTQModel loads the model in (auto: its CPU default, bf16)")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    import polyquant
    from polyquant.models import _gguf_key, cache_dir, default_model_path
    _, tok = polyquant.load_model("default")  # makes sure the fp32 folder is in the cache
    src = str(cache_dir() / "gguf" / _gguf_key(default_model_path()))
    mix = ("pydoc",) if a.calib == "pydoc" else None
    windows = polyquant.calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed, mix=mix)
    calib = [{"input_ids": w.reshape(-1).tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    qc = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, desc_act=a.desc_act)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    model = GPTQModel.load(src, qc, device="cpu", **({} if a.dtype == "auto" else {"dtype": getattr(torch, a.dtype)}))
    model.quantize(calib, batch_size=1, calibration_sort=None)
    quant_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as tmp:
        d = a.save or tmp
        model.save(d)
        del model
        q, _ = polyquant.load(d)
        from polyquant import data
        ppl = {}
        for name in a.texts.split(","):
            text = None if name == "pydoc" else data.builtin_text(name)
            ev = polyquant.evaluate(q, tok, text=text, holdout=True, seqlen=512, max_windows=a.windows,
                                    measure_speed=False, show_progress=False)
            ppl[name] = ev["ppl"]
    row = {"peer": f"gptqmodel {gptqmodel.__version__}", "bits": a.bits, "group_size": a.group_size, "sym": True,
           "desc_act": a.desc_act, "act_group_aware": getattr(qc, "act_group_aware", None), "n_samples": a.n_samples, "seed": a.seed,
           "load_dtype": a.dtype,
           "seqlen": a.seqlen, "threads": a.threads, "quant_seconds": round(quant_s, 1),
           "quant_cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
           "peak_rss_mb": round(r1.ru_maxrss / 1024), "calib": a.calib, "windows": a.windows,
           "ppl": ppl.get("pydoc"), "ppl_by_text": ppl, "kernels": ev.get("kernels"),
           "load_avg_1min": round(os.getloadavg()[0], 1)}
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
