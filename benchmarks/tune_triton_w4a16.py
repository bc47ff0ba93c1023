"""Launch-parameter sweep of triton-w4a16's fused (decode) kernel on a CUDA GPU: for decode
shapes (M = 1, 16) of SmolLM2-135M and Llama-2-7B, every combination of BLOCK_N, BLOCK_K,
split-K and num_stages, timed twice: as launched from Python (``do_bench``: includes the launch
overhead that a decode step pays) and inside a CUDA graph (``do_bench_cudagraph``: the kernel's
GPU time alone). Prints one JSON line per shape with the best configs and the current default's
times; ``_config`` in ``polyquant/kernels/triton_w4a16.py`` is set from these results.

    python benchmarks/tune_triton_w4a16.py [--out tune.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_w4a16 import SHAPES, _weight  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton_w4a16: no CUDA device", file=sys.stderr)
        return 0
    from triton.testing import do_bench, do_bench_cudagraph
    from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul
    dev = torch.device("cuda")
    out = []
    for model, layer, N, K, gs in SHAPES:
        qw = _weight(N, K, gs, False, dev)
        buf = prepare_w4a16(qw)
        wd = qw.dequantize(torch.bfloat16)
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            rows = []
            base = lambda: w4a16_matmul(x, buf, 4, gs, 8, N, K)  # noqa: E731
            dense = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wd), rep=20)
            default = (do_bench(base, warmup=10, rep=50), do_bench_cudagraph(base, rep=20))
            for bn, bk, sk, st, nw in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16),
                                                        (2, 3, 4), (4,)):
                fn = lambda: w4a16_matmul(x, buf, 4, gs, 8, N, K, block_n=bn, block_k=bk, split_k=sk,  # noqa: E731
                                          num_stages=st, num_warps=nw)
                try:
                    fn()
                    t = do_bench_cudagraph(fn, rep=10)
                except Exception as e:  # noqa: BLE001
                    rows.append({"bn": bn, "bk": bk, "split_k": sk, "stages": st, "error": str(e)[:80]})
                    continue
                rows.append({"bn": bn, "bk": bk, "split_k": sk, "stages": st, "warps": nw, "graph_ms": t})
            ok = sorted((r for r in rows if "graph_ms" in r), key=lambda r: r["graph_ms"])
            best = ok[0]
            fn = lambda: w4a16_matmul(x, buf, 4, gs, 8, N, K, block_n=best["bn"], block_k=best["bk"],  # noqa: E731
                                      split_k=best["split_k"], num_stages=best["stages"])
            res = {"model": model, "layer": layer, "N": N, "K": K, "gs": gs, "M": M,
                   "dense_graph_ms": round(dense, 5), "default_launch_ms": round(default[0], 5),
                   "default_graph_ms": round(default[1], 5), "best": ok[:5],
                   "best_launch_ms": round(do_bench(fn, warmup=10, rep=50), 5),
                   "bound_ms": round((N * K / 2 + N * K / gs * 2) / 3.0e12 * 1e3, 5),
                   "errors": sum("error" in r for r in rows)}
            out.append(res)
            print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
