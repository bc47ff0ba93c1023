"""GPU check for the FP8 kernels (issue 5), to run on a CUDA machine with compute capability >= 8.9:

1. the activation rule on CUDA is bit-identical to the CPU definition (every recipe, fixed input);
2. ``fp8-scaled-mm`` and ``triton-fp8-block`` agree with the CPU emulation (relative max error,
   bf16 output) on DeepSeek-like and default-model shapes, including partial 128-blocks (576);
3. the block FP8 Triton GEMM against ``torch._scaled_mm`` (row-wise) and a bf16 matmul at decode
   and prefill shapes (whole-model speed: ``bench_gpu_model.py``).

    python benchmarks/gpu_check_fp8.py            # prints one JSON line per check, exits 1 on a failure

"""
from __future__ import annotations

import json
import sys
import time

import torch


def _out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def check_act_rule() -> bool:
    from polyquant.kernels.fp8 import Fp8ActQuant
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g) * torch.logspace(-5, 3, 64).unsqueeze(1)
    x[3] = 0
    ok = True
    for act in (Fp8ActQuant("fbgemm", scale_ub=1200.0), Fp8ActQuant("deepseek", 128), Fp8ActQuant("ct"),
                Fp8ActQuant("ct", 64), Fp8ActQuant("ct", scale=torch.tensor([0.05]))):
        q, s = act.quantize(x)
        qc, sc = act.to("cuda").quantize(x.cuda())
        same = torch.equal(q.view(torch.uint8), qc.cpu().view(torch.uint8)) and torch.equal(s, sc.cpu())
        ok &= same
        _out(check="act_rule_bit_exact", rule=repr(act), ok=same)
    return ok


def check_kernels() -> bool:
    from polyquant.kernels import get_kernel
    from polyquant.kernels.fp8 import Fp8ActQuant
    from polyquant.methods.fp8 import fp8_quantize
    from polyquant.nn import QuantLinear
    ok = True
    for (m, n, k, block, act, kern) in [(1, 1536, 576, (1, 576), Fp8ActQuant("fbgemm", scale_ub=1200.0), "fp8-scaled-mm"),
                                        (512, 1536, 576, (1, 576), Fp8ActQuant("ct"), "fp8-scaled-mm"),
                                        (1, 576, 1536, (128, 128), Fp8ActQuant("deepseek", 128), "triton-fp8-block"),
                                        (512, 576, 576, (128, 128), Fp8ActQuant("deepseek", 128), "triton-fp8-block"),
                                        (256, 7168, 2048, (128, 128), Fp8ActQuant("deepseek", 128), "triton-fp8-block")]:
        w = torch.randn(n, k)
        layer = QuantLinear(fp8_quantize(w, block, "transformers"), act_quant=act)
        x = torch.randn(m, k)
        ref = layer(x)  # CPU emulation (fp32)
        layer = layer.cuda()
        layer.set_kernel(kern)
        xb = x.cuda().bfloat16()
        y = layer(xb).float().cpu()
        err = float((y - ref).abs().max() / ref.abs().max())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            layer(xb)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / 50 * 1e6
        good = err < 2e-2  # bf16 input rounding + bf16 output
        ok &= good
        _out(check="kernel_vs_emulation", kernel=kern, shape=[m, n, k], block=list(block), rel_err=err, us=us, ok=good)
    return ok


def bench_layers() -> bool:
    """The fine-grained FP8 Triton kernel against ``torch._scaled_mm`` (row-wise scales, the
    fastest FP8 GEMM PyTorch ships) and a bf16 matmul, at decode and prefill shapes: the GEMM
    alone (activations already quantized) and the whole layer (activation quantization included)."""
    from triton.testing import do_bench
    from polyquant.kernels.fp8 import Fp8ActQuant, fp8_scaled_mm
    from polyquant.kernels.triton_fp8_block import fp8_block_matmul
    from polyquant.methods.fp8 import fp8_quantize
    from polyquant.nn import QuantLinear
    ok = True
    for (n, k) in [(1536, 576), (4096, 4096), (11008, 4096), (7168, 2048), (2048, 7168)]:
        w = torch.randn(n, k, device="cuda")
        wb = w.bfloat16()
        qb = fp8_quantize(w, (128, 128), "transformers")
        qc = fp8_quantize(w, (1, k), "fbgemm")
        wq_b, ws_b = qb.data.contiguous(), qb.scale.float().contiguous()
        blk = QuantLinear(qb, act_quant=Fp8ActQuant("deepseek", 128)).cuda()
        blk.set_kernel("triton-fp8-block")
        for m in (1, 16, 512, 2048):
            x = torch.randn(m, k, device="cuda").bfloat16()
            xq_b, xs_b = Fp8ActQuant("deepseek", 128).to("cuda").quantize(x)
            xq_r, xs_r = Fp8ActQuant("ct").to("cuda").quantize(x)
            wq_c, ws_c = qc.data, qc.scale.reshape(1, -1).float()
            t_bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), warmup=25, rep=100)
            t_blk = do_bench(lambda: fp8_block_matmul(xq_b, xs_b, wq_b, ws_b, (128, 128), 128),
                             warmup=25, rep=100)
            try:
                t_smm = do_bench(lambda: fp8_scaled_mm(xq_r, xs_r, wq_c, ws_c), warmup=25, rep=100)
            except Exception as e:  # noqa: BLE001
                t_smm = None
                _out(check="scaled_mm", error=str(e)[:200])
            t_layer = do_bench(lambda: blk(x), warmup=25, rep=100)
            _out(check="fp8_gemm_bench", shape=[m, n, k], bf16_us=round(t_bf16 * 1e3, 2),
                 triton_block_gemm_us=round(t_blk * 1e3, 2),
                 scaled_mm_rowwise_us=None if t_smm is None else round(t_smm * 1e3, 2),
                 triton_block_layer_us=round(t_layer * 1e3, 2),
                 block_vs_bf16=round(t_bf16 / t_blk, 3),
                 block_vs_scaled_mm=None if t_smm is None else round(t_smm / t_blk, 3),
                 tflops_block=round(2 * m * n * k / (t_blk * 1e-3) / 1e12, 1))
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        _out(check="cuda", ok=False, reason="no CUDA device")
        return 1
    cap = torch.cuda.get_device_capability()
    _out(check="device", name=torch.cuda.get_device_name(), capability=list(cap), torch=torch.__version__)
    ok = check_act_rule() & check_kernels() & bench_layers()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
