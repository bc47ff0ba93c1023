"""Whole-model speed on a CUDA GPU: decode and prefill tokens/s, batch 1, of polyquant's GPU
paths against bf16, on two decoder shapes with random weights (no checkpoint travels to the GPU
machine; speed does not depend on the values): SmolLM2-135M's and a Llama-3.2-1B-class shape.

Rows: bf16; RTN W4 sym and asym (``triton-w4a16``); RTN W8 per-channel (``triton-w4a16``, 8-bit);
fine-grained FP8 128x128 (``triton-fp8-block``); FBGEMM FP8 (``fp8-scaled-mm``). Each row names
the kernels that ran, the weight bytes, and the agreement of its logits with the reference kernel
of the same quantized model (top-1 over one window), so a fast wrong kernel cannot hide.

    python benchmarks/bench_gpu_model.py [--out results.json] [--models smollm2,llama1b]

Prints one JSON object per row on stderr as it goes and the whole result as JSON on stdout.
Exits 0 with a message where CUDA is missing.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, group_size=64),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, group_size=128),
}


def _configs(gs: int):
    from polyquant.methods import RTNConfig
    from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig
    return [("rtn-w4-sym", RTNConfig(bits=4, group_size=gs, sym=True)),
            ("rtn-w4-asym", RTNConfig(bits=4, group_size=gs, sym=False)),
            ("rtn-w8-pc", RTNConfig(bits=8, group_size=-1, sym=True)),
            ("fp8-block-128", Fp8BlockConfig()),
            ("fbgemm-fp8", FbgemmFp8Config())]


def _model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = {k: v for k, v in shape.items() if k != "group_size"}
    cfg = LlamaConfig(max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return m


def _speed(model, vocab: int, prefill_len: int) -> dict:
    from polyquant.eval.speed import decode_tok_s, prefill_tok_s
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 32), generator=g)
    window = torch.randint(0, vocab, (1, prefill_len), generator=g)
    r = decode_tok_s(model, prompt, n=128, runs=3, budget_s=20.0)
    r.update(prefill_tok_s(model, window, runs=5, budget_s=5.0))
    return r


def _top1(model, ref_model, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        a = model(input_ids=ids, use_cache=False).logits.argmax(-1)
        b = ref_model(input_ids=ids, use_cache=False).logits.argmax(-1)
    return float((a == b).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--prefill", type=int, default=1024)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_model: CUDA is not available; nothing to measure (run it on a GPU).", file=sys.stderr)
        return 0
    import polyquant
    from polyquant.eval.memory import weight_bytes
    from polyquant.nn import kernel_summary, set_kernels

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name in args.models.split(","):
        shape = SHAPES[name]
        base = _model(shape)
        vocab = shape["vocab_size"]
        row = {"model": name, "setting": "bf16", "kernels": {"torch-linear": 1},
               "weight_bytes": weight_bytes(base), **_speed(base, vocab, args.prefill)}
        bf16 = row
        res["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        for label, cfg in _configs(shape["group_size"]):
            row = {"model": name, "setting": label}
            try:
                t0 = time.perf_counter()
                q = polyquant.quantize(copy.deepcopy(base), cfg, inplace=True, show_progress=False)
                torch.cuda.synchronize()
                row["quantize_s"] = round(time.perf_counter() - t0, 2)
                set_kernels(q)
                row["kernels"] = kernel_summary(q)
                row["weight_bytes"] = weight_bytes(q)
                row.update(_speed(q, vocab, args.prefill))
                row["decode_vs_bf16"] = round(row["decode_tok_s"] / bf16["decode_tok_s"], 3)
                row["prefill_vs_bf16"] = round(row["prefill_tok_s"] / bf16["prefill_tok_s"], 3)
                ref = copy.deepcopy(q)
                set_kernels(ref, "reference")
                row["top1_vs_reference_kernel"] = _top1(q, ref, vocab)
                del q, ref
            except Exception as e:  # noqa: BLE001 - a failed row is reported, the rest run
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            res["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del base
        gc.collect()
        torch.cuda.empty_cache()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
