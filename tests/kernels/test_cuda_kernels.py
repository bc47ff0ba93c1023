"""The CUDA kernels compiled for real (not Triton's interpreter): ``triton-w4a16``,
``triton-fp8-block`` and ``fp8-scaled-mm`` against the reference (dequantize + matmul in float64,
or the CPU emulation for fp8), at the default model's and 7B-class shapes, decode and prefill;
and ``auto`` picking them for a quantized model moved to CUDA.

Skipped on machines without a CUDA device (CI has none). Run on a GPU with
``benchmarks/gpu_check.sh``, which also benchmarks the kernels.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytest.importorskip("triton")

from helpers import tiny_llama  # noqa: E402

from polyquant.tensor.quantized_weight import QuantizedWeight  # noqa: E402

CUDA = torch.device("cuda")
# max|y - ref| / max|ref|: bf16 / fp16 output rounding with fp32 accumulation
RTOL = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}


def _int_weight(out, inp, bits=4, gs=64, sym=True, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=g, dtype=torch.uint8)
    ng = -(-inp // gs)
    scale = torch.rand(out, ng, generator=g) * 0.01 + 0.001
    zero = None if sym else torch.randint(0, 2 ** bits, (out, ng), generator=g).float()
    g_idx = None
    if act_order:
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[torch.randperm(inp, generator=g)] = (torch.arange(inp) // gs).int()
    return QuantizedWeight.from_codes(codes, f"{'int' if sym else 'uint'}{bits}", (1, gs), scale, zero, g_idx)


@pytest.mark.parametrize("N,K,gs", [(1536, 576, 64), (576, 1536, 64), (192, 576, 64), (4096, 4096, 128),
                                    (11008, 4096, 128), (4096, 11008, 128)])
@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("M", [1, 16, 512])
def test_w4a16_compiled_matches_reference(N, K, gs, sym, act_order, M):
    from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul
    qw = _int_weight(N, K, 4, gs, sym, act_order, seed=N + K)
    buf = {k: v.to(CUDA) for k, v in prepare_w4a16(qw).items()}
    ref_w = qw.dequantize(torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        y = w4a16_matmul(x.to(CUDA), buf, 4, gs, qw.qt.code_offset, N, K)
        assert y.dtype == dtype and y.shape == (M, N) and y.device.type == CUDA.type
        ref = x.double() @ ref_w.T
        err = float((y.cpu().double() - ref).abs().max() / ref.abs().max())
        assert err < RTOL[dtype], (dtype, err)


@pytest.mark.parametrize("bits", [2, 8])
def test_w4a16_other_bit_widths_compiled(bits):
    from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul
    qw = _int_weight(1536, 576, bits, 64, sym=False, seed=bits)
    buf = {k: v.to(CUDA) for k, v in prepare_w4a16(qw).items()}
    x = torch.randn(16, 576).bfloat16()
    y = w4a16_matmul(x.to(CUDA), buf, bits, 64, qw.qt.code_offset, 1536, 576)
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert float((y.cpu().double() - ref).abs().max() / ref.abs().max()) < RTOL[torch.bfloat16]


def test_rtn_model_on_cuda_picks_triton_and_matches_reference():
    import polyquant
    from polyquant.nn import kernel_summary, set_kernels
    model = tiny_llama(hidden=128, layers=2).eval()
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=4, group_size=64, sym=True), show_progress=False)
    q = q.to(CUDA).to(torch.float16)
    set_kernels(q)
    assert set(kernel_summary(q)) == {"triton-w4a16"}, kernel_summary(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 48), device=CUDA)
    with torch.no_grad():
        fast = q(ids).logits.float()
        set_kernels(q, "reference")
        assert set(kernel_summary(q)) == {"reference"}
        ref = q(ids).logits.float()
    assert float((fast - ref).abs().max() / ref.abs().max()) < 1e-2


def test_fp8_activation_rule_is_bit_identical_on_cuda():
    from polyquant.kernels.fp8 import Fp8ActQuant
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g) * torch.logspace(-5, 3, 64).unsqueeze(1)
    x[3] = 0
    for act in (Fp8ActQuant("fbgemm", scale_ub=1200.0), Fp8ActQuant("deepseek", 128), Fp8ActQuant("ct"),
                Fp8ActQuant("ct", 64), Fp8ActQuant("ct", scale=torch.tensor([0.05]))):
        q, s = act.quantize(x)
        qc, sc = act.to(CUDA).quantize(x.to(CUDA))
        assert torch.equal(q.view(torch.uint8), qc.cpu().view(torch.uint8)), act
        assert torch.equal(s, sc.cpu()), act


@pytest.mark.parametrize("m,n,k,block,recipe,kernel", [
    (1, 1536, 576, (1, 576), ("fbgemm", None), "fp8-scaled-mm"),
    (512, 1536, 576, (1, 576), ("ct", None), "fp8-scaled-mm"),
    (1, 576, 1536, (128, 128), ("deepseek", 128), "triton-fp8-block"),
    (512, 576, 576, (128, 128), ("deepseek", 128), "triton-fp8-block"),
    (256, 7168, 2048, (128, 128), ("deepseek", 128), "triton-fp8-block"),
])
def test_fp8_cuda_kernels_match_cpu_emulation(m, n, k, block, recipe, kernel):
    from polyquant.kernels.fp8 import Fp8ActQuant
    from polyquant.methods.fp8 import fp8_quantize
    from polyquant.nn import QuantLinear
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=g)
    act = Fp8ActQuant(recipe[0], recipe[1], scale_ub=1200.0 if recipe[0] == "fbgemm" else None)
    layer = QuantLinear(fp8_quantize(w, block, "transformers"), act_quant=act)
    x = torch.randn(m, k, generator=g)
    ref = layer(x.bfloat16().float())  # CPU emulation, fp32, same (bf16-representable) input
    layer = layer.to(CUDA)
    layer.set_kernel(kernel)
    y = layer(x.to(CUDA).bfloat16()).float().cpu()
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.parametrize("recipe,group,static", [("ct", None, False), ("fbgemm", None, False), ("deepseek", 128, False),
                                                 ("ct", 64, False), ("ct", None, True)])
@pytest.mark.parametrize("n,k,block", [(4096, 4096, (128, 128)), (11008, 4096, (1, 4096)), (4096, 11008, (128, 128))])
def test_fp8_gemv_compiled_applies_the_rule_exactly(recipe, group, static, n, k, block):
    """The one-row fp8 kernel quantizes the activation inside (hardware e4m3 cast): its sums equal
    the rule's codes times the weight in float64 to fp32 rounding (one code off would show)."""
    import math

    from polyquant.activations.fp8 import Fp8ActQuant, fp8_saturate
    from polyquant.kernels.triton_gemv import fp8_gemv
    g = torch.Generator().manual_seed(n + k)
    bn, bk = block
    ws = torch.rand(math.ceil(n / bn), math.ceil(k / bk), generator=g) * 0.01 + 0.001
    full = ws.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    wq = fp8_saturate(torch.randn(n, k, generator=g) / full)
    act = Fp8ActQuant(recipe, group, scale_ub=30.0 if recipe == "fbgemm" else None, scale=0.02 if static else None)
    x = (torch.randn(1, k, generator=g) * 3).bfloat16()
    ref = act.fake_quant(x).double() @ (wq.double() * full.double()).T
    y = fp8_gemv(x.to(CUDA), act.to(CUDA), wq.to(CUDA), ws.to(CUDA), block, torch.float32).cpu()
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("bits,sym,act_order", [(4, True, False), (4, False, True), (8, True, False), (2, False, False)])
def test_int_gemv_compiled_matches_float64(bits, sym, act_order):
    from polyquant.kernels.triton_gemv import int_gemv
    from polyquant.kernels.triton_w4a16 import prepare_w4a16
    n, k = 11008, 4096
    qw = _int_weight(n, k, bits, 128, sym, act_order, seed=bits)
    buf = {kk: v.to(CUDA) for kk, v in prepare_w4a16(qw).items()}
    x = torch.randn(1, k)
    y = int_gemv(x.to(CUDA), buf, bits, 128, qw.qt.code_offset, n, k).cpu()
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
