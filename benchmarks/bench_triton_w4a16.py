"""Benchmark triton-w4a16 on a CUDA GPU: the kernel vs a bf16/fp16 matmul and vs the memory
bandwidth bound, for decode (M = 1, 16) and prefill (M = 512, 2048) shapes of SmolLM2-135M and
a 7B-class model (Llama-2-7B), symmetric 4-bit, with and without act-order, and against
PyTorch's own CUDA int4 GEMM (``torch._weight_int4pack_mm``, what torchao's int4 layout runs on)
where it applies (bf16, no act-order). Prints JSON.

    python benchmarks/bench_triton_w4a16.py [--dtype bf16|fp16] [--out results.json] [--quick]

The bandwidth bound is ``bytes moved / peak bandwidth`` with the peak measured here by a large
device-to-device copy; bytes = packed weight + scales (+ zeros) + activations in and out.
Exits 0 with a message when CUDA or triton is missing (nothing to measure on a CPU machine).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

# (model, layer, out_features N, in_features K, group size)
SHAPES = [
    ("SmolLM2-135M", "q_proj/o_proj", 576, 576, 64),
    ("SmolLM2-135M", "k_proj/v_proj", 192, 576, 64),
    ("SmolLM2-135M", "gate/up_proj", 1536, 576, 64),
    ("SmolLM2-135M", "down_proj", 576, 1536, 64),
    ("Llama-2-7B", "q/k/v/o_proj", 4096, 4096, 128),
    ("Llama-2-7B", "gate/up_proj", 11008, 4096, 128),
    ("Llama-2-7B", "down_proj", 4096, 11008, 128),
]
M_DECODE = (1, 16)
M_PREFILL = (512, 2048)


def _peak_bandwidth(device) -> float:
    from triton.testing import do_bench
    n = 256 * 2**20  # 1 GiB of fp32
    a = torch.empty(n, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=100)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def _weight(N: int, K: int, gs: int, act_order: bool, device):
    from polyquant.tensor.quantized_weight import QuantizedWeight
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    ng = math.ceil(K / gs)
    scale = (torch.rand(N, ng, generator=g) * 0.01 + 0.001).half()
    g_idx = None
    if act_order:
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[torch.randperm(K, generator=g)] = (torch.arange(K) // gs).int()
    return QuantizedWeight.from_codes(codes, "int4", (1, gs), scale, None, g_idx).to(device)


def _tinygemm(N: int, K: int, gs: int, device):
    """PyTorch's own CUDA int4 GEMM (``_weight_int4pack_mm``, the "tinygemm" kernel torchao's
    int4 weight-only layout runs on): packed weight and bf16 scales+zeros, random codes (timing only)."""
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=device)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    w = torch._convert_weight_to_int4pack(packed, 8)
    sz = torch.rand(K // gs, N, 2, device=device, dtype=torch.bfloat16)
    return w, sz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="7B shapes only, no act-order")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_w4a16: CUDA is not available on this machine; nothing to benchmark "
              "(run it on a GPU).", file=sys.stderr)
        return 0
    try:
        from triton.testing import do_bench
    except ImportError:
        print("bench_triton_w4a16: triton is not installed (pip install triton); nothing to benchmark.",
              file=sys.stderr)
        return 0
    from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul

    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    bw = _peak_bandwidth(device)
    results = {"device": torch.cuda.get_device_name(device), "dtype": args.dtype, "torch": torch.__version__,
               "peak_copy_bandwidth_GBps": round(bw / 1e9, 1), "rows": []}
    shapes = [s for s in SHAPES if not args.quick or s[0] == "Llama-2-7B"]
    for model, layer, N, K, gs in shapes:
        for act_order in ((False,) if args.quick else (False, True)):
            qw = _weight(N, K, gs, act_order, device)
            buf = prepare_w4a16(qw)
            w_dense = qw.dequantize(dtype)
            wbytes = sum(t.numel() * t.element_size() for t in buf.values())
            for M in M_DECODE + M_PREFILL:
                x = torch.randn(M, K, device=device, dtype=dtype)
                run = lambda: w4a16_matmul(x, buf, 4, gs, 8, N, K)  # noqa: E731
                y = run()
                ref = torch.nn.functional.linear(x.float(), w_dense.float())
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                t_q = do_bench(run, warmup=25, rep=200)
                t_d = do_bench(lambda: torch.nn.functional.linear(x, w_dense), warmup=25, rep=200)
                t_tg = tg_err = None
                if not act_order and dtype == torch.bfloat16 and K % gs == 0:
                    try:
                        tw, tsz = _tinygemm(N, K, gs, device)
                        t_tg = do_bench(lambda: torch._weight_int4pack_mm(x, tw, gs, tsz), warmup=25, rep=200)
                    except Exception as e:  # noqa: BLE001 - reported, not fatal
                        tg_err = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                moved = wbytes + M * K * x.element_size() + M * N * x.element_size()
                t_bound = moved / bw * 1e3
                results["rows"].append({
                    "model": model, "layer": layer, "N": N, "K": K, "group_size": gs, "act_order": act_order,
                    "M": M, "phase": "decode" if M in M_DECODE else "prefill",
                    "w4a16_ms": round(t_q, 5), "dense_ms": round(t_d, 5),
                    "speedup_vs_dense": round(t_d / t_q, 3),
                    "bandwidth_bound_ms": round(t_bound, 5), "fraction_of_bound": round(t_bound / t_q, 3),
                    "w4a16_TFLOPs": round(2 * M * N * K / (t_q * 1e-3) / 1e12, 2),
                    "max_rel_err": float(f"{err:.3g}"),
                    "torch_int4pack_ms": None if t_tg is None else round(t_tg, 5),
                    "speedup_vs_torch_int4pack": None if t_tg is None else round(t_tg / t_q, 3),
                    **({"torch_int4pack_error": tg_err} if tg_err else {}),
                })
                print(json.dumps(results["rows"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
