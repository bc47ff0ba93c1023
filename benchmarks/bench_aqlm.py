"""AQLM on the default model (SmolLM2-135M): accuracy at ~2 bits against GPTQ / HQQ / RTN, quantization
time, interop with transformers + the ``aqlm`` package, decode speed against the ``aqlm`` Numba kernel.

Quality stage (one process; the same calibration and windows as ``bench_gptq_default.py``: 128 x 512
calibration tokens of ``--calib`` (pydoc), seed 0, exact fp32 forwards; perplexity on the first
``--windows`` held-back windows of 512 of each ``--texts`` text: pydoc, and enwiki out of domain).
Rows: fp32, AQLM (``--scheme``, default 2x8 g8), GPTQ W3 g64, GPTQ W2 g64 (sym, group-aware order), HQQ
2-bit g64, RTN W2 g64 sym; ``aqlm-ft`` is the AQLM row with block fine-tuning (``--finetune-epochs``,
``--finetune-lr``, ``--finetune-batch``; each block's output error before / after is recorded). Each row appends one JSON line to ``--out`` as it
finishes. The AQLM row saves its checkpoint (``--ckpt``, ``aqlm`` format) and records where the
quantization time went (k-means init / code search / code books / scales per layer, summed; the rest
is the calibration forwards and statistics). Interop: transformers (with ``aqlm`` installed) loads the
checkpoint and its logits on one 512-token window are compared with ``polyquant.load``'s (cosine).

    nice -n 5 taskset -c 1 python benchmarks/bench_aqlm.py quality --out bench-results/aqlm.jsonl

Speed stage (1 thread, batch 1, greedy decode of 64 tokens after a 32-token prompt, KV cache; rows
interleaved round-robin in one process): fp32, polyquant's ``cpu-aqlm`` on the checkpoint, and the same
checkpoint through transformers + ``aqlm`` (its Numba ``numba_gemm_lut`` kernel for Kx8 on CPU):

    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_aqlm.py speed --out bench-results/aqlm.jsonl

Global stage: the AQLM paper's end-to-end fine-tuning (``polyquant.finetune.codebook``) of the
checkpoint at ``--ckpt`` (made by the quality stage): code books, scales and norms distilled from the
float model's logits on windows of the calibration text's tokens (``--global-steps`` x
``--global-batch`` x ``--global-seq-len``, ``--global-lr``), then the same perplexities as the
quality stage; the per-step loss goes to ``--global-log`` and the tuned model to ``--global-save``:

    nice -n 5 taskset -c 1 python benchmarks/bench_aqlm.py global --ckpt bench-results/aqlm-2x8-ckpt --out ...

Layers stage (cheap): per-layer Hessian-weighted output error of AQLM and the peers on the same Linears:

    nice -n 5 taskset -c 1 python benchmarks/bench_aqlm.py layers --n-samples 16 --out bench-results/aqlm.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import polyquant  # noqa: E402
from polyquant.calibration import Calibration, calibration_data  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _emit(row: dict, out: str | None) -> None:
    row = {**row, "load_avg_1min": round(os.getloadavg()[0], 1)}
    print(json.dumps(row), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _bpw(model) -> float | None:
    from polyquant.nn.quant_linear import QuantLinear
    bits = n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qw = m.quantized_weight
            bits += qw.nbytes() * 8
            n += qw.shape[0] * qw.shape[1]
    return bits / n if n else None


def quality(a) -> None:
    from polyquant.methods import GPTQConfig, RTNConfig
    from polyquant.methods import aqlm as aqlm_mod
    from polyquant.methods.aqlm import AQLMConfig
    from polyquant.methods.hqq import HQQConfig
    torch.set_num_threads(a.threads)
    base, tok = polyquant.load_model("default")
    calib = C.calibration_windows(tok, a.calib, a.n_samples, a.seqlen, a.seed)
    rows = [r for r in a.rows.split(",") if r]
    texts = a.texts.split(",")
    common = {"n_samples": a.n_samples, "seqlen": a.seqlen, "seed": a.seed, "windows": a.windows, "threads": a.threads,
              "calib": a.calib}
    for row in rows:
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), _cpu()
        extra: dict = {}
        if row == "fp32":
            q = model
        elif row.startswith("aqlm"):
            m, b = (int(v) for v in a.scheme.split("x"))
            tune = {"finetune_epochs": a.finetune_epochs, "finetune_lr": a.finetune_lr,
                    "finetune_batch": a.finetune_batch} if row == "aqlm-ft" else {}
            cfg = AQLMConfig(num_codebooks=m, nbits_per_codebook=b, in_group_size=a.in_group_size,
                             beam_size=a.beam_size, max_iters=a.max_iters, init_iters=a.init_iters,
                             codebook_steps=a.codebook_steps, **tune)
            phases: dict[str, float] = {}
            orig, orig_tune = aqlm_mod.aqlm_fit, aqlm_mod.fit_block
            block_errors: list = []

            def fit(*args, **kw):
                state, info = orig(*args, **kw)
                for k, v in info["seconds"].items():
                    phases[k] = phases.get(k, 0.0) + v
                return state, info

            def fit_block(*args, **kw):
                res = orig_tune(*args, **kw)
                phases["block fine-tuning"] = phases.get("block fine-tuning", 0.0) + res.seconds
                block_errors.append([round(res.loss_before, 6), round(res.loss_after, 6), res.epochs])
                return res
            aqlm_mod.aqlm_fit, aqlm_mod.fit_block = fit, fit_block
            try:
                q = polyquant.quantize(model, cfg, calibration=Calibration(calib, resume_dir=a.resume_dir, autocast=None),
                                       inplace=True)
            finally:
                aqlm_mod.aqlm_fit, aqlm_mod.fit_block = orig, orig_tune
            if block_errors:
                extra["block_output_error_before_after_epochs"] = block_errors
            extra.update({"config": cfg.to_dict(), "method_seconds": {k: round(v, 1) for k, v in phases.items()}})
        elif row.startswith("gptq"):
            bits = int(row.split("-w")[1].split("-")[0])
            cfg = GPTQConfig(bits=bits, group_size=64, sym=True)
            q = polyquant.quantize(model, cfg, calibration=Calibration(calib, autocast=None), inplace=True)
        elif row == "hqq-2bit-g64":
            q = polyquant.quantize(model, HQQConfig(bits=2, group_size=64), inplace=True)
        elif row == "rtn-w2-g64":
            q = polyquant.quantize(model, RTNConfig(bits=2, group_size=64, sym=True), inplace=True)
        else:
            raise SystemExit(f"unknown row {row!r}")
        quant_s, quant_cpu = time.perf_counter() - t0, _cpu() - c0
        if row.startswith("aqlm"):
            extra["method_seconds"]["other (calibration forwards, statistics)"] = round(
                quant_s - sum(v for k, v in extra["method_seconds"].items()), 1)
            if a.ckpt:
                polyquant.save(q, a.ckpt, tokenizer=tok, overwrite=True)
        ppl = C.ppl_by_text(q, tok, texts, a.windows)
        kernels = sorted({getattr(m, "kernel_name", None) for m in q.modules() if hasattr(m, "kernel_name")} - {None})
        _emit({"stage": "quality", "row": row, **common, "ppl": ppl[texts[0]], "ppl_by_text": ppl,
               "quant_seconds": round(quant_s, 1), "quant_cpu_seconds": round(quant_cpu, 1),
               "bits_per_weight": _bpw(q), "kernels": kernels, **extra}, a.out)
        if row.startswith("aqlm") and a.ckpt:
            _emit({"stage": "interop", **interop(a.ckpt, tok)}, a.out)
        del model, q


def interop(ckpt: str, tok) -> dict:
    """transformers + aqlm load the checkpoint; logits on one 512-token window vs polyquant.load's."""
    from polyquant.eval import make_windows
    x = make_windows(C.eval_stream(tok), 512, 1)[:1]
    pq, _ = polyquant.load(ckpt)
    with torch.inference_mode():
        a = pq(input_ids=x).logits.double().flatten()
    try:
        import aqlm  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"interop": f"skipped: {e}"}
    import numba
    numba.set_num_threads(1)  # aqlm 1.1.7's Numba kernel races across threads (prange over input groups)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():  # the aqlm kernel needs no_grad, not inference mode (it permutes codes in place)
        b = hf(input_ids=x).logits.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(a, b, 0))
    import aqlm as _a
    return {"interop": "transformers+aqlm", "aqlm_version": getattr(_a, "__version__", "?"),
            "cosine": cos, "max_abs_diff": float((a - b).abs().max()), "nan": bool(torch.isnan(b).any())}


def global_tune(a) -> None:
    from polyquant.data import calibration_tokens
    from polyquant.finetune.codebook import CodebookFinetuneConfig, finetune_codebooks
    torch.set_num_threads(a.threads)
    base, tok = polyquant.load_model("default")
    q, _ = polyquant.load(a.ckpt)
    texts = a.texts.split(",")
    cfg = CodebookFinetuneConfig(steps=a.global_steps, lr=a.global_lr, seq_len=a.global_seq_len,
                                 batch_size=a.global_batch, lr_warmup=min(5, a.global_steps - 1),
                                 train_norms=not a.global_freeze_norms)
    before = C.ppl_by_text(q, tok, texts, a.windows) if a.global_baseline else None
    logf = open(a.global_log, "a") if a.global_log else None

    def log(rec):
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
    t0 = time.perf_counter()
    from polyquant.calibration import calibration_stream
    tokens = calibration_tokens(tok) if a.global_text == "pydoc" else calibration_stream(tok)
    tuned, info = finetune_codebooks(base, q, tokens, cfg, checkpoint_dir=a.global_resume, log=log)
    secs = time.perf_counter() - t0
    ppl = C.ppl_by_text(tuned, tok, texts, a.windows)
    if a.global_save:
        polyquant.save(tuned, a.global_save, tokenizer=tok, overwrite=True)
    losses = info["losses"]
    k = max(1, len(losses) // 10)
    _emit({"stage": "global", "ckpt": a.ckpt, "config": cfg.to_dict(), "text": a.global_text,
           "text_tokens": int(tokens.numel()), "threads": a.threads, "windows": a.windows,
           "ppl": ppl[texts[0]], "ppl_by_text": ppl, "ppl_before": before, "seconds": round(secs, 1),
           "seconds_per_step": round(info["seconds"] / max(1, len(losses)), 2),
           "loss_first_tenth": round(sum(losses[:k]) / k, 4), "loss_last_tenth": round(sum(losses[-k:]) / k, 4),
           "bits_per_weight": _bpw(tuned)}, a.out)
    if a.global_save:
        _emit({"stage": "interop", "ckpt": a.global_save, **interop(a.global_save, tok)}, a.out)


def quick_checkpoint(path: str) -> None:
    """A full-size AQLM 2x8 checkpoint of the default model made in about a minute (one k-means assignment
    from sampled code words, no alternation, 1 x 32 calibration tokens): poor accuracy, but the same shapes,
    so the same work per decoded token as a fully optimised one (decode speed only)."""
    from polyquant.methods.aqlm import AQLMConfig
    model, tok = polyquant.load_model("default")
    calib = calibration_data(tok, n_samples=1, seqlen=32, seed=0)
    q = polyquant.quantize(model, AQLMConfig(init_iters=0, max_iters=0), calibration=Calibration(calib, autocast=None),
                           inplace=True, show_progress=False)
    polyquant.save(q, path, tokenizer=tok, overwrite=True)


def layers(a) -> None:
    """Per-layer Hessian-weighted relative output error ``tr(D H D^T) / tr(W H W^T)`` of AQLM 2x8 and the
    2-3-bit peers on the same Linears and Hessians (``--blocks``, ``--n-samples`` x 512 calibration tokens):
    the quantity each method minimises, far cheaper than a whole-model run."""
    from polyquant.calibration.stats import HessianCollector
    from polyquant.methods import get_method
    from polyquant.methods.aqlm import AQLMConfig
    from polyquant.methods import GPTQConfig, RTNConfig
    from polyquant.methods.hqq import HQQConfig
    torch.set_num_threads(a.threads)
    model, tok = polyquant.load_model("default")
    calib = calibration_data(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed)
    blocks = [int(b) for b in a.blocks.split(",")]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    cols, hooks = {}, []
    for b in blocks:
        for n in names:
            lin = model.model.layers[b].get_submodule(n)
            key = f"{b}.{n}"
            cols[key] = HessianCollector(lin.in_features)
            hooks.append(lin.register_forward_pre_hook(lambda m, x, key=key: cols[key].add(x[0])))
    with torch.inference_mode():
        for smp in calib:
            ids = smp["input_ids"] if isinstance(smp, dict) else smp
            model(input_ids=ids if ids.dim() == 2 else ids[None])
    for h in hooks:
        h.remove()
    m, b = (int(v) for v in a.scheme.split("x"))
    configs = {f"aqlm-{a.scheme}": AQLMConfig(num_codebooks=m, nbits_per_codebook=b, max_iters=a.max_iters,
                                              init_iters=a.init_iters, codebook_steps=a.codebook_steps,
                                              beam_size=a.beam_size, in_group_size=a.in_group_size),
               "gptq-w3-g64": GPTQConfig(bits=3, group_size=64), "gptq-w2-g64": GPTQConfig(bits=2, group_size=64),
               "hqq-2bit-g64": HQQConfig(bits=2, group_size=64), "rtn-w2-g64": RTNConfig(bits=2, group_size=64)}
    table: dict[str, dict[str, float]] = {}
    secs: dict[str, float] = {}
    for key, col in cols.items():
        b_, n = key.split(".", 1)
        W = model.model.layers[int(b_)].get_submodule(n).weight.detach().float()
        H = col.H
        den = float(((W @ H) * W).double().sum())
        table[key] = {}
        for row, cfg in configs.items():
            t0 = time.perf_counter()
            qw = get_method(cfg.method).quantize_weight(W, cfg, {"H": H, "n": col.n})
            secs[row] = secs.get(row, 0.0) + time.perf_counter() - t0
            d = W - qw.dequantize()
            table[key][row] = float(((d @ H) * d).double().sum()) / den
            if row.startswith("aqlm"):
                table[key]["aqlm_bits_per_weight"] = qw.bits_per_weight
        print(key, {k: round(v, 5) for k, v in table[key].items()}, flush=True)
    rows = list(configs)
    import math
    geo = {r: math.exp(sum(math.log(max(t[r], 1e-30)) for t in table.values()) / len(table)) for r in rows}
    _emit({"stage": "layers", "blocks": blocks, "n_samples": a.n_samples, "seqlen": a.seqlen, "per_layer": table,
           "geomean_relative_error": geo, "seconds": {k: round(v, 1) for k, v in secs.items()},
           "aqlm_below_gptq_w3_layers": sum(t[rows[0]] < t["gptq-w3-g64"] for t in table.values()),
           "layers": len(table)}, a.out)


def speed(a) -> None:
    from polyquant.eval import make_windows
    if a.quick_ckpt and not Path(a.ckpt, "config.json").exists():
        quick_checkpoint(a.ckpt)
    torch.set_num_threads(1)
    try:
        import numba
        numba.set_num_threads(1)  # 1 thread, as the other rows (and its kernel races with more)
    except ImportError:
        pass
    fp, tok = polyquant.load_model("default")
    prompt = make_windows(C.eval_stream(tok), 32, 1)[0]
    rows = {"fp32": fp}
    pq, _ = polyquant.load(a.ckpt)
    rows["pq-cpu-aqlm"] = pq
    try:
        import aqlm  # noqa: F401
        from transformers import AutoModelForCausalLM
        rows["aqlm-numba"] = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
    except ImportError as e:
        print(f"aqlm not installed: {e}", file=sys.stderr)
    res: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    toks = {}
    for k, m in rows.items():  # warm-up (numba compiles here)
        C._decode_once(m, prompt, 8, torch.no_grad)
    for _ in range(a.rounds):
        for k, m in rows.items():
            w, c, t = C._decode_once(m, prompt, 64, torch.no_grad)
            res[k].append(64 / w)
            cpu[k].append(64 / c)
            toks[k] = t[:16].tolist()
    med = {k: statistics.median(v) for k, v in res.items()}
    _emit({"stage": "speed", "threads": 1, "rounds": a.rounds, "decode_tok_s": med,
           "decode_tok_s_cpu": {k: statistics.median(v) for k, v in cpu.items()},
           "runs": {k: [round(x, 2) for x in v] for k, v in res.items()},
           "ratio_pq_vs_aqlm": med["pq-cpu-aqlm"] / med["aqlm-numba"] if "aqlm-numba" in med else None,
           "ratio_pq_vs_fp32": med["pq-cpu-aqlm"] / med["fp32"],
           "ratio_aqlm_vs_fp32": med["aqlm-numba"] / med["fp32"] if "aqlm-numba" in med else None,
           "same_tokens_pq_aqlm": toks.get("pq-cpu-aqlm") == toks.get("aqlm-numba"),
           "kernels": sorted({getattr(m, "kernel_name", None) for m in pq.modules()} - {None})}, a.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["quality", "speed", "layers", "global"])
    ap.add_argument("--blocks", default="0,10,20,29")
    ap.add_argument("--quick-ckpt", action="store_true", help="speed: make a quick full-size checkpoint if --ckpt is absent")
    ap.add_argument("--rows", default="aqlm,fp32,gptq-w3-g64,gptq-w2-g64,hqq-2bit-g64,rtn-w2-g64")
    ap.add_argument("--scheme", default="2x8")
    ap.add_argument("--in-group-size", type=int, default=8)
    ap.add_argument("--beam-size", type=int, default=1)
    ap.add_argument("--max-iters", type=int, default=4)
    ap.add_argument("--init-iters", type=int, default=12)
    ap.add_argument("--codebook-steps", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=10, help="row aqlm-ft: block fine-tuning epochs")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--finetune-batch", type=int, default=4)
    ap.add_argument("--global-steps", type=int, default=100)
    ap.add_argument("--global-lr", type=float, default=1e-3)
    ap.add_argument("--global-seq-len", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=1)
    ap.add_argument("--global-text", choices=("pydoc", "mix"), default="pydoc",
                    help="global: train on pydoc's calibration slice, or on the pydoc + enwiki slices (the CLI's default)")
    ap.add_argument("--global-freeze-norms", action="store_true")
    ap.add_argument("--global-baseline", action="store_true", help="global: also measure the checkpoint untuned")
    ap.add_argument("--global-log", default=None)
    ap.add_argument("--global-save", default=None)
    ap.add_argument("--global-resume", default=None, help="global: checkpoint folder (resumes a cut run)")
    ap.add_argument("--n-samples", type=int, default=128)
    C.add_text_args(ap)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ckpt", default="bench-results/aqlm-2x8-ckpt")
    ap.add_argument("--resume-dir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("polyquant.methods.aqlm").setLevel(logging.INFO)  # per-layer error and time
    {"quality": quality, "speed": speed, "layers": layers, "global": global_tune}[a.stage](a)


if __name__ == "__main__":
    main()
