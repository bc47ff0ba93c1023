"""BitNet b1.58 on the default model (SmolLM2-135M): interop, speed, accuracy. Prints JSON lines.

Parts (``python benchmarks/bench_bitnet.py PART [options]``):

* ``interop``: a tiny Llama ternarized by polyquant, saved as BitNet (``bitlinear`` and ``autobitlinear``),
  loaded by plain transformers on the CPU (``torch.compile`` disabled: eager, the same arithmetic):
  logits cosine / max |diff| against ``polyquant.load``; and a checkpoint written from the specification
  (``tests/formats/test_bitnet.py``'s writer) loaded by both.
* ``speed``: decode (greedy, KV cache, 1 thread) and prefill (one 512-token window) of the default model
  in fp32, ternarized (absmean PTQ, lm_head float, ``cpu-ternary``) and RTN W4 g64 on ``cpu-lut4``
  (and ``auto``; ``--bf16-head`` adds the ternary and W4 rows with the float head in bf16), interleaved
  rounds; run it under ``flock /tmp/polyquant-core0.lock taskset -c 0``.
* ``ppl``: perplexity of fp32 and absmean PTQ on the first ``--windows`` evaluation windows.
* ``finetune``: ternary fine-tuning (resumable: ``--ckpt`` folder), then the perplexity of the result
  on the same windows; ``--stop-after`` bounds the steps run in this call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def _emit(d: dict) -> None:
    print(json.dumps(d, default=str), flush=True)


def _ppl(model, tok, windows: int) -> float:
    from polyquant.eval import evaluate
    r = evaluate(model, tok, max_windows=windows, measure_speed=False, show_progress=False)
    return float(r["ppl"])


# -- finetune ---------------------------------------------------------------------------------
def part_finetune(args) -> None:
    import polyquant
    from polyquant.data import calibration_tokens
    from polyquant.finetune.ternary import TernaryFinetuneConfig, finetune_ternary, to_bitnet
    torch.set_num_threads(args.threads)
    model, tok = polyquant.load_model("default")
    cfg = TernaryFinetuneConfig(steps=args.steps, seq_len=512, lr=args.lr, quant_warmup=args.quant_warmup,
                                checkpoint_every=args.checkpoint_every)
    log_path = Path(args.ckpt) / "log.jsonl"
    Path(args.ckpt).mkdir(parents=True, exist_ok=True)

    def log(d):
        with open(log_path, "a") as f:
            f.write(json.dumps(d) + "\n")

    student, info = finetune_ternary(model, calibration_tokens(tok), cfg, checkpoint_dir=args.ckpt,
                                     stop_after=args.stop_after, show_progress=False, log=log)
    q = to_bitnet(student, cfg, info)
    res = {"part": "finetune", "steps_done": info["step"], "steps": cfg.steps, "seconds": info["seconds"],
           "seconds_per_step": round(info["seconds"] / max(1, len(info["losses"])), 2) if info["losses"] else None,
           "first_loss": info["losses"][0] if info["losses"] else None,
           "last_loss": info["losses"][-1] if info["losses"] else None, "config": cfg.to_dict(),
           "threads": args.threads, "load_avg": os.getloadavg()}
    if args.windows:
        res["ppl_finetuned"] = _ppl(q, tok, args.windows)
        res["windows"] = args.windows
    if args.out:
        from polyquant.formats import save
        save(q, args.out, tokenizer=tok, overwrite=True)
        res["saved"] = args.out
    _emit(res)


# -- interop ----------------------------------------------------------------------------------
def part_interop(args) -> None:
    import tempfile

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import polyquant
    from formats.test_bitnet import write_spec_checkpoint  # the checkpoint writer from the specification
    from helpers import tiny_llama
    from polyquant.formats import load, save
    from polyquant.methods.bitnet import BitNetConfig
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def hf(folder):
        with torch._dynamo.config.patch(disable=True):  # eager BitLinear: the same arithmetic, no compile
            m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            with torch.no_grad():
                return type(m.model.layers[0].mlp.down_proj).__name__, m(ids).logits

    def cmp(a, b):
        return {"cosine": float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)),
                "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(b.abs().max()),
                "bit_identical": bool(torch.equal(a, b))}

    res = {"part": "interop", "model": "tiny Llama (hidden 64, 2 layers, vocab 256), 2 x 64 tokens", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(tie=False)
        for cls in ("bitlinear", "autobitlinear"):
            q = polyquant.quantize(model, BitNetConfig(linear_class=cls), show_progress=False)
            out = save(q, Path(tmp) / f"ours-{cls}")
            ours, _ = load(out)
            with torch.no_grad():
                a = ours(ids).logits
            layer, b = hf(out)
            res["runs"].append({"direction": "polyquant -> transformers", "linear_class": cls, "hf_layer": layer,
                                **cmp(a, b)})
            spec = write_spec_checkpoint(model, Path(tmp) / f"spec-{cls}", cls)
            ours, _ = load(spec)
            with torch.no_grad():
                a = ours(ids).logits
            layer, b = hf(spec)
            res["runs"].append({"direction": "spec-written -> polyquant vs transformers", "linear_class": cls,
                                "hf_layer": layer, **cmp(a, b)})
    _emit(res)


# -- speed ------------------------------------------------------------------------------------
def part_speed(args) -> None:
    import _common as C
    import polyquant
    from polyquant.data import eval_tokens
    from polyquant.methods.bitnet import BitNetConfig
    from polyquant.methods.bnb import BnbNF4Config
    from polyquant.methods.rtn import RTNConfig
    from polyquant.nn.quantize import kernel_summary, set_kernels
    torch.set_num_threads(1)
    model, tok = polyquant.load_model("default")
    ids = eval_tokens(tok)
    prompt, window = ids[:C.PROMPT_TOKENS], ids[:512]
    rows = {"fp32": model}
    rows["bitnet-ternary"] = polyquant.quantize(model, BitNetConfig(), show_progress=False)
    w4 = polyquant.quantize(model, RTNConfig(bits=4, group_size=64), show_progress=False)
    rows["rtn-w4g64-auto"] = w4
    try:  # cpu-lut4 takes integer codes only on AVX-512 CPUs (elsewhere it names cpu-int4 as faster)
        lut = polyquant.quantize(model, RTNConfig(bits=4, group_size=64), show_progress=False)
        set_kernels(lut, "cpu-lut4")
        rows["rtn-w4g64-cpu-lut4"] = lut
        lut_note = None
    except ValueError as e:
        lut_note = str(e)
    nf4 = polyquant.quantize(model, BnbNF4Config(blocksize=64), show_progress=False)
    set_kernels(nf4, "cpu-lut4")
    rows["nf4-b64-cpu-lut4"] = nf4
    if args.bf16_head:  # the float head (49152 x 576, 113 MB in fp32: the largest read of a ternary token) in bf16
        import copy

        from polyquant.nn.runtime import set_float_dtype
        for k in ("bitnet-ternary", "rtn-w4g64-cpu-lut4"):
            if k in rows:
                m = copy.deepcopy(rows[k])
                set_float_dtype(m, torch.bfloat16, scope="lm_head")
                rows[k + "+bf16-head"] = m
    from polyquant.eval.memory import weight_bytes
    info = {k: {"kernels": kernel_summary(m) if k != "fp32" else {"float": 1}, "weight_bytes": weight_bytes(m)}
            for k, m in rows.items()}
    dec = {k: [] for k in rows}
    pre = {k: [] for k in rows}
    for k, m in rows.items():  # warm-up (library load, first-call allocations)
        C.measure_decode(m, prompt, 4, 1, "inference_mode", warmup=False)
    first = {}
    for r in range(args.rounds):  # interleaved: a change of load hits every row alike
        for k, m in rows.items():
            d = C.measure_decode(m, prompt, args.decode_tokens, 1, "inference_mode", warmup=False)
            dec[k].append(d["decode_tok_s"])
            first.setdefault(k, d["decode_first_tokens"])
        for k, m in rows.items():
            if r < args.prefill_rounds:
                pre[k].append(C.measure_prefill(m, window, 1, "inference_mode")["prefill_tok_s"])
    res = {"part": "speed", "threads": 1, "rounds": args.rounds, "decode_tokens": args.decode_tokens,
           "prefill_tokens": 512, "load_avg": os.getloadavg(), "cpu": _cpu(), "cpu_lut4_int4_note": lut_note}
    for k in rows:
        res[k] = {**info[k], "decode_tok_s": statistics.median(dec[k]), "decode_runs": [round(v, 2) for v in dec[k]],
                  "prefill_tok_s": statistics.median(pre[k]), "first_tokens": first[k]}
    fp = res["fp32"]
    for k in rows:
        res[k]["decode_vs_fp32"] = round(res[k]["decode_tok_s"] / fp["decode_tok_s"], 3)
        res[k]["prefill_vs_fp32"] = round(res[k]["prefill_tok_s"] / fp["prefill_tok_s"], 3)
    for k in rows:
        if k.startswith(("rtn", "nf4")):
            res[f"ternary_vs_{k}_decode"] = round(res["bitnet-ternary"]["decode_tok_s"] / res[k]["decode_tok_s"], 3)
    _emit(res)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()


# -- ppl --------------------------------------------------------------------------------------
def part_ppl(args) -> None:
    import polyquant
    from polyquant.methods.bitnet import BitNetConfig
    torch.set_num_threads(args.threads)
    model, tok = polyquant.load_model("default")
    t0 = time.perf_counter()
    fp = _ppl(model, tok, args.windows)
    res = {"part": "ppl", "windows": args.windows, "seqlen": 512, "ppl_fp32": fp}
    for g in args.granularity:
        q = polyquant.quantize(model, BitNetConfig(granularity=g), show_progress=False)
        res[f"ppl_ptq_{g}"] = _ppl(q, tok, args.windows)
        del q
    res["seconds"] = round(time.perf_counter() - t0, 1)
    _emit(res)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    f = sub.add_parser("finetune")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--lr", type=float, default=2e-4)
    f.add_argument("--quant-warmup", type=int, default=20)
    f.add_argument("--checkpoint-every", type=int, default=5)
    f.add_argument("--ckpt", required=True)
    f.add_argument("--stop-after", type=int, default=None)
    f.add_argument("--windows", type=int, default=8)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--out", default=None)
    p = sub.add_parser("ppl")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--granularity", nargs="+", default=["tensor"])
    sp = sub.add_parser("speed")
    sp.add_argument("--rounds", type=int, default=5)
    sp.add_argument("--prefill-rounds", type=int, default=2)
    sp.add_argument("--decode-tokens", type=int, default=32)
    sp.add_argument("--bf16-head", action="store_true",
                    help="also the ternary and W4 cpu-lut4 rows with the float lm_head computed in bf16 (lossy cast)")
    sub.add_parser("interop")
    args = ap.parse_args(argv)
    {"interop": part_interop, "finetune": part_finetune, "ppl": part_ppl, "speed": part_speed}[args.part](args)


if __name__ == "__main__":
    main()
