"""Decode at the memory limit: tok/s and the fraction of the bandwidth bound, plain vs fast runtime.

Batch-1 decode reads every weight once per token, so its floor is (bytes read per token) / (memory
bandwidth). This script measures, in one process and one run:

* the bandwidth one thread reads at (best of several sums over a 1 GiB float32 buffer: far larger
  than any cache), ``--threads`` threads likewise;
* for each row, the bytes read per token from the model's own layout (quantized layers' stored
  bytes as their kernel reads them, the head in its dtype or layout, one embedding row);
* decode tok/s (greedy, batch 1, 64 new tokens after a 32-token prompt, KV cache) with the model's
  own forward (``plain``) and with :class:`polyquant.nn.decode.FastDecoder` (``fast``: its compiled
  one-token layer step, ``cpu-gemv``'s float32 matrix-vector products, where it takes the layer), rows
  interleaved round-robin so a load change hits all alike; thread-CPU and wall medians;
* the ratio to fp32 (plain) and the fraction of each row's bound.

``tok_s`` times the 64 steps (wall); ``tok_s_cpu`` divides by the thread CPU time of the whole call,
prompt included (the compiled step's prompt dequantizes every layer once: that time is in it).

Rows: ``fp32``, ``w8`` (RTN W8 per-channel), ``w4`` (RTN W4 g64 sym, head fp32), ``w4-head-bf16``,
``w4-head-w4`` (the head quantized at W4 g64 too), ``w4-head-w8``, ``nf4`` (bnb NF4 b64).
Greedy tokens of the fast runtime are checked against the plain ones for every row, and its logits
at every step against the reference kernel (dequantize + float32 matmul) run over the same tokens
(``max_logit_diff``: the largest absolute difference over the 64 steps, and relative to the largest
logit); the plain path's too. ``--python-step`` adds the fast runtime without its compiled layer step
(``FastDecoder(native=False)``, the layers' own kernels) as a third runtime.

    flock /tmp/polyquant-core0.lock taskset -c 0 python benchmarks/bench_decode.py --rounds 5

Prints one JSON object (and writes ``--out``, default ``bench-results/decode.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = ("fp32", "w8", "w4", "w4-head-bf16", "w4-head-w8", "w4-head-w4", "nf4")


def bandwidth_gbs(threads: int, mib: int = 1024, runs: int = 5) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(mib * 1024 * 1024 // 4)
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every Linear / QuantLinear once, one embedding row."""
    from polyquant.nn.quant_linear import QuantLinear
    total = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bufs = [b for n, b in m.named_buffers(recurse=False) if n.startswith("k_")] or \
                [b for n, b in m.named_buffers(recurse=False) if n.startswith("qw_")]
            total += sum(b.numel() * b.element_size() for b in bufs if b.data_ptr() not in seen)
            seen.update(b.data_ptr() for b in bufs)
        elif isinstance(m, torch.nn.Linear):
            w = m.weight
            if w.data_ptr() not in seen:
                total += w.numel() * w.element_size()
                seen.add(w.data_ptr())
    emb = model.get_input_embeddings().weight
    return total + emb.shape[1] * emb.element_size()


def logit_diffs(model, dec, prompt, new) -> dict:
    """Max |logit - reference| over the decode steps for the fast runtime and the plain path: the
    reference is the model run with the reference kernel (dequantize + float32 matmul) over the
    prompt and the fast runtime's tokens in one forward; the model's kernels are restored after."""
    from polyquant.nn.quantize import set_kernels
    from polyquant.nn.quant_linear import QuantLinear
    seq = torch.cat([prompt.reshape(-1), new.reshape(-1)])
    n0 = prompt.numel()
    with torch.no_grad():
        plain = model(seq[None]).logits[0, n0 - 1:-1].float()
        had = {m: m._kernel_request for m in model.modules() if isinstance(m, QuantLinear)}
        if had:
            set_kernels(model, "reference")
        ref = model(seq[None]).logits[0, n0 - 1:-1].float()
        for m, k in had.items():
            m.set_kernel(k)
    dec.reset()
    steps = [dec(prompt.reshape(-1))]
    for t in new[:-1]:
        steps.append(dec(t.reshape(1)))
    fast = torch.stack(steps)
    scale = float(ref.abs().max())
    f, p = float((fast - ref).abs().max()), float((plain - ref).abs().max())
    return {"fast": f, "plain": p, "fast_rel": f / scale, "plain_rel": p / scale, "max_abs_logit": scale}


def build(row: str, model):
    import polyquant
    from polyquant.nn.runtime import set_float_dtype
    if row == "fp32":
        return model
    if row == "w8":
        return polyquant.quantize(model, polyquant.RTNConfig(bits=8, group_size=-1), show_progress=False)
    if row == "nf4":
        from polyquant.methods import get_method
        cfg = get_method("bnb-nf4").config_cls()
        return polyquant.quantize(model, cfg, show_progress=False)
    head = {"w4-head-w4": 4, "w4-head-w8": 8}.get(row)
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=4, group_size=64), show_progress=False)
    if head is not None:  # the head quantized too (its own weight: the embedding stays float)
        from polyquant.methods.rtn import rtn_quantize
        w = model.lm_head.weight.detach().clone()
        qw = rtn_quantize(w, polyquant.RTNConfig(bits=head, group_size=64 if head == 4 else -1))
        q.lm_head = polyquant.QuantLinear(qw, method="rtn")
        return q
    if row == "w4-head-bf16":
        set_float_dtype(q, torch.bfloat16, scope="lm_head")
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-results/decode.json")
    ap.add_argument("--python-step", action="store_true", help="also time FastDecoder(native=False)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import polyquant
    from polyquant.eval.speed import greedy_decode
    from polyquant.nn.decode import FastDecoder, fast_greedy_decode

    model, tok = polyquant.load_model("default")
    model.eval()
    from polyquant.data import eval_tokens  # the evaluation slice's first tokens are the prompt
    prompt = eval_tokens(tok)[:32]
    rows = [r for r in args.rows.split(",") if r]
    built = {r: build(r, model) for r in rows}
    max_len = prompt.numel() + args.tokens + 1
    decs = {r: FastDecoder(m, max_len=max_len) for r, m in built.items()}
    runtimes = ("plain", "fast") + (("python",) if args.python_step else ())
    pys = {r: FastDecoder(m, max_len=max_len, native=False) for r, m in built.items()} if args.python_step else {}
    bw1 = bandwidth_gbs(args.threads)
    times: dict[str, dict[str, list[tuple[float, float]]]] = {r: {rt: [] for rt in runtimes} for r in rows}
    same: dict[str, bool] = {}
    toks: dict[str, torch.Tensor] = {}
    for r in rows:  # warm-up, and the token check
        a, _ = greedy_decode(built[r], prompt, args.tokens)
        b, _ = fast_greedy_decode(decs[r], prompt, args.tokens)
        same[r] = bool(torch.equal(a, b))
        toks[r] = b
        if r in pys:
            fast_greedy_decode(pys[r], prompt, args.tokens)
    for _ in range(args.rounds):
        for r in rows:
            for rt in runtimes:
                c0 = time.thread_time()
                if rt == "plain":
                    _, s = greedy_decode(built[r], prompt, args.tokens)
                else:
                    _, s = fast_greedy_decode((decs if rt == "fast" else pys)[r], prompt, args.tokens)
                times[r][rt].append((s, time.thread_time() - c0))
    diffs = {r: logit_diffs(built[r], decs[r], prompt, toks[r]) for r in rows}
    out = {"bench": "decode", "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
           "bandwidth_gbs": bw1, "platform": platform.processor() or platform.machine(),
           "torch": torch.__version__, "rows": {}}
    fp32_wall = None
    for r in rows:
        bpt = bytes_per_token(built[r])
        bound = bw1 * 1e9 / bpt
        row = {"bytes_per_token": bpt, "bound_tok_s": bound, "same_tokens_fast_vs_plain": same[r],
               "kernels": sorted({getattr(m, "kernel_name", "") for m in built[r].modules()
                                  if hasattr(m, "kernel_name")}), "fallbacks": decs[r].fallbacks,
               "native_layers": decs[r].native_layers, "native_head": decs[r].native_head,
               "max_logit_diff_vs_reference": diffs[r]}
        for rt in runtimes:
            wall = args.tokens / statistics.median(s for s, _ in times[r][rt])
            cpu = args.tokens / statistics.median(c for _, c in times[r][rt])
            row[rt] = {"tok_s": wall, "tok_s_cpu": cpu, "of_bound": wall / bound}
        if r == "fp32":
            fp32_wall = row["plain"]["tok_s"]
        out["rows"][r] = row
    if fp32_wall:
        for r in rows:
            for rt in runtimes:
                out["rows"][r][rt]["x_fp32"] = out["rows"][r][rt]["tok_s"] / fp32_wall
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print(f"\nbandwidth {bw1:.1f} GB/s ({args.threads} thread(s))")
    print(f"{'row':14} {'MB/tok':>7} {'bound':>7} {'plain':>7} {'fast':>7} {'x fp32':>7} {'of bound':>8} same "
          f"{'fast-ref':>9} {'plain-ref':>9}" + ("  python" if args.python_step else ""))
    for r, v in out["rows"].items():
        d = v["max_logit_diff_vs_reference"]
        print(f"{r:14} {v['bytes_per_token'] / 1e6:7.1f} {v['bound_tok_s']:7.1f} {v['plain']['tok_s']:7.1f} "
              f"{v['fast']['tok_s']:7.1f} {v['fast'].get('x_fp32', 0):7.2f} {v['fast']['of_bound']:8.2f} "
              f"{v['same_tokens_fast_vs_plain']!s:5} {d['fast']:9.2e} {d['plain']:9.2e}"
              + (f"  {v['python']['tok_s']:6.1f}" if args.python_step else ""))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
