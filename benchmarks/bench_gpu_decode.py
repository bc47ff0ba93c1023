"""GPU batch-1 decode (issue 19): tokens/s of the graph runtime against bf16 and the bandwidth bound.

Two parts, each printing one JSON object per line as it goes (and the whole result to ``--out``):

``sweep``: the one-row kernels of :mod:`polyquant.kernels.triton_gemv` at a model's layer shapes
(fused q/k/v, o, fused gate/up, down, head), each launch timed inside a CUDA graph
(``triton.testing.do_bench_cudagraph``), over a grid of launch parameters, next to a bf16
``F.linear`` and the previous paths (the 16-row tensor-core kernel for integer codes; the
separate activation quantization + block-FP8 GEMM for fp8). Reports each shape's GB/s and the
fraction of the copy bandwidth measured in the same run, and the parameters with the best
geometric-mean time over the shapes.

``decode``: whole models with random weights (speed does not depend on the values; no checkpoint
travels to a GPU machine): bf16 and polyquant's GPU layouts (RTN W4 g128 sym / asym, W4 act-order,
W8 per-channel, fine-grained FP8 128x128, FBGEMM FP8, int8 dynamic), each decoded by the model's own
forward (``plain``) and by :class:`polyquant.nn.graph_decode.GraphDecoder` (``graph``: one CUDA
graph launch per token). Each row gives tok/s, the bytes read per token (the kernels' weight
buffers plus the KV cache the graph step reads), the bound ``bandwidth / bytes`` and the fraction of
it reached, the ratio to bf16 in the same runtime and to plain bf16, the kernels that ran, and
whether the captured graph gave the same 32 greedy tokens as the same step run eagerly.

    python benchmarks/bench_gpu_decode.py sweep  [--model llama-7b] [--out sweep.json]
    python benchmarks/bench_gpu_decode.py decode [--models llama-7b,llama-1b] [--apply sweep.json] [--out decode.json]

Exits 0 with a message where CUDA is missing.
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from bench_gpu_model import SHAPES as _GPU_MODEL_SHAPES  # noqa: E402  (smollm2-135m, llama-1b)

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, group_size=128),
    **_GPU_MODEL_SHAPES,
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, group_size=64),
}


DEV = "cuda"  # --smoke: "cpu" (the decode part's code paths on a tiny model, no GPU numbers)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def emit(obj: dict, sink: list) -> None:
    sink.append(obj)
    print(json.dumps(obj), flush=True)


def copy_bandwidth(gb: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (the HBM bandwidth a kernel can use)."""
    n = int(gb * 2 ** 30) // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    bw = 2 * 4 * n * 10 / (s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return bw


def layer_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = h // nh
    return {"qkv": ((nh + 2 * nkv) * hd, h), "o": (h, nh * hd), "gate_up": (2 * i, h), "down": (h, i),
            "head": (shape["vocab_size"], h)}


def _bench(fn) -> float:
    if DEV != "cuda":  # --smoke: one interpreted call (code paths only)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from triton.testing import do_bench_cudagraph
    return float(do_bench_cudagraph(fn, rep=20)) * 1e-3  # seconds per call


# -- sweep ---------------------------------------------------------------------------------------
def sweep(args) -> dict:
    from polyquant.activations.fp8 import Fp8ActQuant
    from polyquant.kernels import triton_gemv as tg
    from polyquant.kernels.triton_fp8_block import fp8_block_matmul
    from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul
    from polyquant.methods.fp8 import fp8_quantize
    from polyquant.tensor.quantized_weight import QuantizedWeight

    rows: list = []
    bw = copy_bandwidth() if DEV == "cuda" else 10e9
    emit({"part": "sweep", "device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "copy_bandwidth_gb_s": round(bw / 1e9, 1)}, rows)
    shape = SHAPES[args.model]
    gs = shape["group_size"]
    g = torch.Generator().manual_seed(0)
    int_grid = [c for c in itertools.product((32, 64, 128), (256, 512, 1024, 2048), (4, 8, 16, 32), (4, 8))
                if c[0] * c[1] <= 65536]
    fp8_grid = list(itertools.product((16, 32, 64, 128), (4, 8, 16, 32), (4,)))
    if DEV != "cuda":
        int_grid, fp8_grid = int_grid[:2], fp8_grid[:2]
    int_times: dict = {c: [] for c in int_grid}
    fp8_times: dict = {c: [] for c in fp8_grid}
    for name, (n, k) in layer_shapes(shape).items():
        x = torch.randn(1, k, generator=g).to(DEV, torch.bfloat16)
        wb = torch.randn(n, k, generator=g).to(DEV, torch.bfloat16)
        t_bf16 = _bench(lambda: F.linear(x, wb))
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        qw = QuantizedWeight.from_codes(codes, "int4", (1, gs), torch.rand(n, k // gs, generator=g) * 0.01)
        buf = {kk: v.to(DEV) for kk, v in prepare_w4a16(qw).items()}
        int_bytes = sum(v.numel() * v.element_size() for v in buf.values())
        t_old = _bench(lambda: w4a16_matmul(x, buf, 4, gs, 8, n, k, gemv=False))
        best = (math.inf, None)
        for c in int_grid:
            bn, bk, waves, warps = c
            try:
                t = _bench(lambda: tg.int_gemv(x, buf, 4, gs, 8, n, k, block_n=bn, block_k=bk, waves=waves,
                                               num_warps=warps))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                t = math.inf
                print(json.dumps({"config_error": str(c), "error": str(e)[:200]}), file=sys.stderr)
            int_times[c].append(t)
            best = min(best, (t, c))
        emit({"part": "sweep", "kernel": "int4-gemv", "layer": name, "N": n, "K": k, "bytes": int_bytes,
              "bf16_us": round(t_bf16 * 1e6, 2), "prev_kernel_us": round(t_old * 1e6, 2),
              "best_us": round(best[0] * 1e6, 2), "best_config": best[1],
              "best_gb_s": round(int_bytes / best[0] / 1e9, 1), "best_of_bandwidth": round(int_bytes / best[0] / bw, 3),
              "bf16_of_bandwidth": round(n * k * 2 / t_bf16 / bw, 3), "vs_bf16": round(t_bf16 / best[0], 2),
              "vs_prev": round(t_old / best[0], 2)}, rows)
        # fp8: block 128x128 weights with deepseek groups of 128 (fused rule) vs quantize + block GEMM
        w32 = torch.randn(n, k, generator=g)
        ft = fp8_quantize(w32, (128, 128), "transformers").tensors()
        wq, ws = ft["data"].to(DEV), ft["scale"].to(DEV)
        act = Fp8ActQuant("deepseek", 128).to(DEV)
        fp8_bytes = wq.numel() + ws.numel() * 4

        def prev():
            xq, xs = act.quantize(x)
            return fp8_block_matmul(xq, xs, wq, ws, (128, 128), 128, torch.bfloat16)

        t_prev = _bench(prev)
        best = (math.inf, None)
        for c in fp8_grid:
            bn, waves, warps = c
            try:
                t = _bench(lambda: tg.fp8_gemv(x, act, wq, ws, (128, 128), block_n=bn, waves=waves, num_warps=warps))
            except Exception as e:  # noqa: BLE001
                t = math.inf
                print(json.dumps({"config_error": str(c), "error": str(e)[:200]}), file=sys.stderr)
            fp8_times[c].append(t)
            best = min(best, (t, c))
        emit({"part": "sweep", "kernel": "fp8-gemv (deepseek 128, fused)", "layer": name, "N": n, "K": k,
              "bytes": fp8_bytes, "bf16_us": round(t_bf16 * 1e6, 2), "prev_kernel_us": round(t_prev * 1e6, 2),
              "best_us": round(best[0] * 1e6, 2), "best_config": best[1],
              "best_of_bandwidth": round(fp8_bytes / best[0] / bw, 3), "vs_bf16": round(t_bf16 / best[0], 2),
              "vs_prev": round(t_prev / best[0], 2)}, rows)
    gm = lambda ts: math.exp(sum(math.log(t) for t in ts) / len(ts)) if all(math.isfinite(t) for t in ts) else math.inf  # noqa: E731
    best_int = min(int_grid, key=lambda c: gm(int_times[c]))
    best_fp8 = min(fp8_grid, key=lambda c: gm(fp8_times[c]))
    res = {"part": "sweep", "best_int": {"block_n": best_int[0], "block_k": best_int[1], "waves": best_int[2],
                                        "warps": best_int[3]},
           "best_fp8": {"block_n": best_fp8[0], "waves": best_fp8[1], "warps": best_fp8[2]},
           "defaults_were": {k: list(v) for k, v in tg.GEMV_DEFAULTS.items()},
           "default_int_gm_us": round(gm(int_times.get(tuple(tg.GEMV_DEFAULTS["int"]), [math.inf])) * 1e6, 2),
           "best_int_gm_us": round(gm(int_times[best_int]) * 1e6, 2)}
    emit(res, rows)
    return {"rows": rows, "best": res}


def apply_sweep(path: str) -> dict | None:
    from polyquant.kernels import triton_gemv as tg
    try:
        with open(path) as f:
            best = json.load(f)["best"]
    except (OSError, KeyError, ValueError):
        return None
    bi, bf = best["best_int"], best["best_fp8"]
    tg.GEMV_DEFAULTS["int"] = (bi["block_n"], bi["block_k"], bi["waves"], bi["warps"])
    tg.GEMV_DEFAULTS["fp8"] = (bf["block_n"], tg.GEMV_DEFAULTS["fp8"][1], bf["waves"], bf["warps"])
    return {k: list(v) for k, v in tg.GEMV_DEFAULTS.items()}


# -- whole-model decode ------------------------------------------------------------------------------
def _model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = {k: v for k, v in shape.items() if k != "group_size"}
    cfg = LlamaConfig(max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    with torch.device(DEV):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return m


def _configs(gs: int):
    from polyquant.methods import RTNConfig
    from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig
    from polyquant.methods.torchao import TorchAOInt8DynamicConfig
    return [("w4-g%d-sym" % gs, RTNConfig(bits=4, group_size=gs, sym=True)),
            ("fp8-block-128", Fp8BlockConfig()),
            ("fbgemm-fp8", FbgemmFp8Config()),
            ("w8-per-channel", RTNConfig(bits=8, group_size=-1, sym=True)),
            ("w4-g%d-act-order" % gs, "act-order"),
            ("w4-g%d-asym" % gs, RTNConfig(bits=4, group_size=gs, sym=False)),
            ("int8-dynamic", TorchAOInt8DynamicConfig())]


def _act_order(model, seed: int = 0):
    """Every QuantLinear of a W4 model rebuilt with a random act-order ``g_idx`` (groups of the
    same size, columns shuffled): the layout GPTQ act-order checkpoints have (speed only)."""
    from polyquant.nn import QuantLinear
    from polyquant.tensor.quantized_weight import QuantizedWeight
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        perms: dict = {}  # siblings (same parent, same input size) share one g_idx, as GPTQ gives them
        for cname, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                qw = child.quantized_weight
                k = qw.shape[1]
                if k not in perms:
                    perms[k] = torch.randperm(k, generator=g)
                gi = (torch.arange(k) // qw.block[1]).int()[perms[k]].to(qw.codes.device)
                nq = QuantizedWeight.from_codes(qw.codes, qw.qtype, qw.block, qw.scale, qw.zero, gi)
                setattr(mod, cname, QuantLinear(nq, child.bias, method=child.method))
    return model


#: the buffers each kernel reads at decode (others: every quantized tensor and kernel buffer)
_READS = {"triton-w4a16": ("k_",), "int8-dynamic": ("k_w", "k_s"), "triton-fp8-block": ("qw_data", "qw_scale"),
          "fp8-scaled-mm": ("qw_data", "k_ws")}


def read_bytes(model) -> int:
    """Bytes of weights the decode step reads per token: each QuantLinear's buffers its kernel reads
    (:data:`_READS`), float Linears' weights; tied tensors once."""
    from torch import nn

    from polyquant.nn import QuantLinear
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, QuantLinear):
            want = _READS.get(m.kernel_name, ("qw_", "k_"))
            for k, v in m.named_buffers(recurse=False):
                if any(k == w or (w.endswith("_") and k.startswith(w)) for w in want):
                    add(v)
            add(m.bias)
        elif isinstance(m, nn.Linear):
            add(m.weight)
            add(m.bias)
    return total


def _decode(model, vocab: int, runtime: str, n: int, runs: int) -> dict:
    from polyquant.eval.speed import decode_tok_s
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    return decode_tok_s(model, prompt, n=n, runs=runs, budget_s=30.0, runtime=runtime)


def _graph_check(model, vocab: int) -> dict:
    from polyquant.nn.graph_decode import GraphDecoder, graph_greedy_decode
    p = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(3))
    eager = GraphDecoder(model, max_len=80, graph=False)
    want, _ = graph_greedy_decode(eager, p, 32)
    del eager
    dec = GraphDecoder(model, max_len=80)
    got, _ = graph_greedy_decode(dec, p, 32)
    return {"graph_captured": dec.captured, "graph_tokens_equal_eager": bool(torch.equal(got, want)),
            "graph_fallbacks": dec.fallbacks[:4]}


def _profile(model, vocab: int, steps: int = 5) -> dict:
    """CUDA kernel time of the decode step (eager, profiler): total per token and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from polyquant.nn.graph_decode import GraphDecoder
    dec = GraphDecoder(model, max_len=80, graph=False)
    p = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(4))
    tok = dec(p).argmax(-1, keepdim=True)
    dec.generate(tok, 3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.generate(tok, steps)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    t = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)  # noqa: E731
    kern = [e for e in ev if t(e) > 0 and e.count > 0]
    total = sum(t(e) for e in kern)
    top = sorted(kern, key=lambda e: -t(e))[:8]
    return {"kernel_us_per_token": round(total / steps, 1), "kernels_per_token": round(sum(e.count for e in kern) / steps, 1),
            "top": [[e.key[:60], round(t(e) / steps, 1), round(e.count / steps, 1)] for e in top],
            "fused_ops": dec.fused_ops_reason is None}


def decode(args) -> dict:
    import polyquant
    from polyquant.nn import kernel_summary, set_kernels

    rows: list = []
    applied = apply_sweep(args.apply) if args.apply else None
    bw = copy_bandwidth() if DEV == "cuda" else 10e9
    emit({"part": "decode", "device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
          "copy_bandwidth_gb_s": round(bw / 1e9, 1), "gemv_params": applied}, rows)
    for name in args.models.split(","):
        shape = SHAPES[name]
        vocab = shape["vocab_size"]
        base = _model(shape)
        hd = shape["hidden_size"] // shape["num_attention_heads"]
        max_len = 32 + args.tokens + 1
        kv_graph = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * max_len * hd * 2
        ref: dict = {}
        todo = [("bf16", None)] + _configs(shape["group_size"])
        if args.rows:
            keep = set(args.rows.split(","))
            todo = [t for t in todo if t[0] in keep or t[0] == "bf16"]
        for label, cfg in todo:
            row = {"part": "decode", "model": name, "setting": label}
            q = None
            try:
                if cfg is None:
                    q = base
                    row["kernels"] = {"torch-linear": 1}
                else:
                    t0 = time.perf_counter()
                    real = ref.get("w4") if cfg == "act-order" else cfg
                    q = polyquant.quantize(copy.deepcopy(base), real, inplace=True, show_progress=False)
                    if cfg == "act-order":
                        q = _act_order(q)
                    set_kernels(q)
                    _sync()
                    row["quantize_s"] = round(time.perf_counter() - t0, 2)
                    row["kernels"] = kernel_summary(q)
                    if label.endswith("-sym"):
                        ref["w4"] = cfg
                wb = read_bytes(q)
                row["weight_bytes_read"] = wb
                row["kv_bytes_graph_step"] = kv_graph
                bound = bw / (wb + kv_graph)
                row["bound_tok_s"] = round(bound, 1)
                plain_rows = None if args.plain_rows == "all" else set(args.plain_rows.split(","))
                for rt in ("plain", "graph"):
                    if rt == "plain" and plain_rows is not None and label not in plain_rows and cfg is not None:
                        continue
                    r = _decode(q, vocab, rt, args.tokens if rt == "graph" else args.plain_tokens, 3)
                    row[f"{rt}_tok_s"] = round(r["decode_tok_s"], 1)
                    if rt == "graph":
                        row["graph_fallbacks"] = r.get("decode_runtime_fallbacks") or r.get("decode_runtime_fallback")
                if args.fused_ops:  # the fused small ops (not yet the default)
                    from polyquant.nn.graph_decode import GraphDecoder, graph_greedy_decode
                    fd = GraphDecoder(q, max_len=32 + args.tokens + 1, fused_ops=True)
                    pr = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(1))
                    graph_greedy_decode(fd, pr, 8)
                    ts = sorted(graph_greedy_decode(fd, pr, args.tokens)[1] for _ in range(3))
                    row["graph_fused_tok_s"] = round(args.tokens / ts[1], 1)
                    del fd
                row["graph_of_bound"] = round(row["graph_tok_s"] / bound, 3)
                if cfg is None:
                    ref["bf16"] = row
                else:
                    b = ref["bf16"]
                    row["graph_vs_bf16_graph"] = round(row["graph_tok_s"] / b["graph_tok_s"], 3)
                    row["graph_vs_bf16_plain"] = round(row["graph_tok_s"] / b["plain_tok_s"], 3)
                    if "plain_tok_s" in row:
                        row["plain_vs_bf16_plain"] = round(row["plain_tok_s"] / b["plain_tok_s"], 3)
                if "plain_tok_s" in row:
                    row["graph_vs_plain"] = round(row["graph_tok_s"] / row["plain_tok_s"], 3)
                row.update(_graph_check(q, vocab))
                if label in ("bf16", "w4-g128-sym", "fp8-block-128"):
                    try:
                        row["profile"] = _profile(q, vocab)
                    except Exception as e:  # noqa: BLE001
                        row["profile"] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:  # noqa: BLE001 - a failed row is reported, the rest run
                import traceback
                row["error"] = f"{type(e).__name__}: {e}"[:600]
                row["where"] = traceback.format_exc().splitlines()[-6:]
            emit(row, rows)
            if q is not None and q is not base:
                del q
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()
        del base
        gc.collect()
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("sweep", "decode"))
    p.add_argument("--model", default="llama-7b", help="sweep: the shape whose layers are timed")
    p.add_argument("--models", default="llama-7b", help="decode: comma-separated shapes")
    p.add_argument("--rows", help="decode: only these settings (comma-separated; bf16 always)")
    p.add_argument("--apply", help="decode: launch parameters from a sweep's --out file")
    p.add_argument("--tokens", type=int, default=128, help="graph decode tokens per run")
    p.add_argument("--plain-tokens", type=int, default=48, help="plain decode tokens per run")
    p.add_argument("--plain-rows", default="w4-g128-sym,fp8-block-128,w4-g64-sym",
                   help="decode: settings also timed with the model's own forward (bf16 always; 'all', 'none')")
    p.add_argument("--fused-ops", action="store_true", help="decode: also time the graph with fused small ops")
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true", help="decode part on the CPU (code paths only)")
    args = p.parse_args(argv)
    global DEV
    if args.smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("bench_gpu_decode: CUDA is not available; nothing to measure (run it on a GPU).", file=sys.stderr)
        return 0
    res = sweep(args) if args.part == "sweep" else decode(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
