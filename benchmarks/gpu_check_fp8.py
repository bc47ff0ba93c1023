"""GPU check for the FP8 kernels (issue 5), to run on a CUDA machine with compute capability >= 8.9:

1. the activation rule on CUDA is bit-identical to the CPU definition (every recipe, fixed input);
2. ``fp8-scaled-mm`` and ``triton-fp8-block`` agree with the CPU emulation (relative max error,
   bf16 output) on DeepSeek-like and default-model shapes, including partial 128-blocks (576);
3. the default model: which kernels ``auto`` picks, perplexity on 8 windows of 512 (GPU vs the
   CPU numbers of ``bench_fp8.py``), and decode / prefill tokens per second against bf16.

    python benchmarks/gpu_check_fp8.py            # prints one JSON line per check, exits 1 on a failure

Not run yet: no GPU was available when this was written.
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


def check_model() -> bool:
    import polyquant
    from polyquant.eval import evaluate
    from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig, fp8_preset
    from polyquant.nn.quantize import kernel_summary, set_kernels
    model, tok = polyquant.load_model("default")
    ok = True
    base = evaluate(model.cuda().bfloat16(), tok, seqlen=512, max_windows=8, decode_tokens=64, show_progress=False)
    _out(check="model", name="bf16", ppl=base["ppl"], decode_tok_s=base["decode_tok_s"], prefill_tok_s=base["prefill_tok_s"])
    for cfg in (FbgemmFp8Config(), Fp8BlockConfig(), fp8_preset("FP8_DYNAMIC")):
        m, _ = polyquant.load_model("default")
        q = polyquant.quantize(m, cfg, inplace=True, show_progress=False).cuda().bfloat16()
        set_kernels(q)
        r = evaluate(q, tok, seqlen=512, max_windows=8, decode_tokens=64, show_progress=False)
        good = r["ppl"] / base["ppl"] - 1 < 0.02
        ok &= good
        _out(check="model", name=cfg.describe(), kernels=kernel_summary(q), ppl=r["ppl"],
             decode_tok_s=r["decode_tok_s"], prefill_tok_s=r["prefill_tok_s"], ok=good)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        _out(check="cuda", ok=False, reason="no CUDA device")
        return 1
    cap = torch.cuda.get_device_capability()
    _out(check="device", name=torch.cuda.get_device_name(), capability=list(cap), torch=torch.__version__)
    ok = check_act_rule() & check_kernels() & check_model()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
