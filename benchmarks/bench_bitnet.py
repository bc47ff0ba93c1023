"""BitNet b1.58 on the default model (SmolLM2-135M): interop, speed, accuracy. Prints JSON lines.

Parts (``python benchmarks/bench_bitnet.py PART [options]``):

* ``interop``: a tiny Llama ternarized by polyquant, saved as BitNet (``bitlinear`` and ``autobitlinear``),
  loaded by plain transformers on the CPU (``torch.compile`` disabled: eager, the same arithmetic):
  logits cosine / max |diff| against ``polyquant.load``; and a checkpoint written from the specification
  (``tests/formats/test_bitnet.py``'s writer) loaded by both.
* ``speed``: decode (greedy, KV cache, 1 thread) and prefill (one 512-token window) of the default model
  in fp32, ternarized (absmean PTQ, lm_head float, ``cpu-ternary``) and RTN W4 g64 on ``cpu-lut4``
  (and ``auto``), interleaved rounds; run it under ``flock /tmp/polyquant-core0.lock taskset -c 0``.
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
    args = ap.parse_args(argv)
    {"finetune": part_finetune, "ppl": part_ppl}[args.part](args)


if __name__ == "__main__":
    main()
