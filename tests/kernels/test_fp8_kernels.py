"""FP8 kernels: the activation rule bit-exact against hand-written transcriptions of each source's
definition (FBGEMM, DeepSeek-V3, compressed-tensors) on fixed inputs; the CPU emulation against
the definition; the CUDA paths' glue (``torch._scaled_mm`` runs on CPU too) and the Triton block
kernel in Triton's interpreter; registration (CUDA kernels never picked on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polyquant.kernels import get_kernel, select_kernel
from polyquant.kernels.fp8 import Fp8ActQuant, fp8_scaled_mm
from polyquant.methods.fp8 import fp8_quantize
from polyquant.nn import QuantLinear

E4M3 = torch.float8_e4m3fn
F32 = torch.float32


# -- hand-written specifications (one row / one group at a time, fp32 scalars) -------------------
def spec_fbgemm(x: torch.Tensor, ub: float):
    """FBGEMM ``_kernel_quantize_fp8_row``: cur_max = clamp(max|row|, 1e-12, ub); a_scale = 448 / cur_max;
    q = clamp(row * a_scale, -448, 448) -> e4m3; stored scale = 1 / a_scale."""
    qs, ss = [], []
    for row in x.float().reshape(-1, x.shape[-1]):
        cur = torch.clamp(row.abs().max(), 1e-12, ub)
        a = torch.tensor(448.0, dtype=F32) / cur
        qs.append(torch.clamp(row * a, -448.0, 448.0).to(E4M3))
        ss.append((1.0 / a).reshape(1))
    return torch.stack(qs), torch.stack(ss)


def spec_deepseek(x: torch.Tensor, g: int):
    """DeepSeek-V3 ``act_quant``: per 1 x g block, s = max(amax, 1e-4) / 448, y = x / s."""
    rows = x.float().reshape(-1, x.shape[-1])
    qs = torch.empty(rows.shape, dtype=E4M3)
    ss = torch.empty(rows.shape[0], -(-rows.shape[1] // g))
    for i, row in enumerate(rows):
        for j, k0 in enumerate(range(0, row.numel(), g)):
            blk = row[k0:k0 + g]
            s = torch.clamp(blk.abs().max(), min=1e-4) / 448.0
            qs[i, k0:k0 + g] = torch.clamp(blk / s, -448.0, 448.0).to(E4M3)
            ss[i, j] = s
    return qs, ss


def spec_ct(x: torch.Tensor, g: int | None):
    """compressed-tensors dynamic float8: s = max(|min|, |max|) / ((448 - -448) / 2), s == 0 -> eps;
    q = clamp(x / s) -> e4m3 (per token, or per token and group)."""
    rows = x.float().reshape(-1, x.shape[-1])
    g = g or rows.shape[1]
    qs = torch.empty(rows.shape, dtype=E4M3)
    ss = torch.empty(rows.shape[0], -(-rows.shape[1] // g))
    for i, row in enumerate(rows):
        for j, k0 in enumerate(range(0, row.numel(), g)):
            blk = row[k0:k0 + g]
            s = torch.maximum(torch.clamp(blk.min(), max=0).abs(), torch.clamp(blk.max(), min=0)) / 448.0
            s = torch.where(s == 0, torch.tensor(torch.finfo(F32).eps), s)
            qs[i, k0:k0 + g] = torch.clamp(blk / s, -448.0, 448.0).to(E4M3)
            ss[i, j] = s
    return qs, ss


def _fixed_input(k: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, k, generator=g) * torch.tensor([1.0, 30.0, 1e-3, 1.0, 5000.0, 1.0]).unsqueeze(1)
    x[3] = 0.0  # an all-zero token
    x[2, :130] = 0.0  # a group (of 128) that is all zero, next to tiny values
    x[5, 17] = -3000.0  # an outlier above the fbgemm bound
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("ub", [1200.0, 10.0])
def test_fbgemm_rule_bit_exact(ub):
    x = _fixed_input()
    q, s = Fp8ActQuant("fbgemm", scale_ub=ub).quantize(x)
    sq, ss = spec_fbgemm(x, ub)
    assert torch.equal(_bits(q), _bits(sq)) and torch.equal(s, ss)


@pytest.mark.parametrize("g", [128, 64, 200, 1000])
def test_deepseek_rule_bit_exact(g):
    x = _fixed_input()
    act = Fp8ActQuant("deepseek", g)
    q, s = act.quantize(x)
    sq, ss = spec_deepseek(x, min(g, 200))
    assert torch.equal(_bits(q), _bits(sq)) and torch.equal(s, ss)
    deq = torch.stack([sq[i].float() * ss[i].repeat_interleave(min(g, 200))[:200] for i in range(6)])
    assert torch.equal(act.fake_quant(x), deq)  # partial last group (200 = 128 + 72) expanded right


@pytest.mark.parametrize("g", [None, 64, 128])
def test_ct_rule_bit_exact_and_library(g):
    x = _fixed_input(256)
    act = Fp8ActQuant("ct", g)
    q, s = act.quantize(x)
    sq, ss = spec_ct(x, g)
    assert torch.equal(_bits(q), _bits(sq)) and torch.equal(s, ss)
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    args = QuantizationArgs(**act.ct_args)
    x3 = x.unsqueeze(0)  # [batch, tokens, K]: the library's token strategy keeps dims 0 and 1
    scale, zp = compute_dynamic_scales_and_zp(x3, args, module=torch.nn.Module())
    theirs = fake_quantize(x3, scale, zp, args)
    assert ct is not None and torch.equal(theirs[0], act(x))


def test_hand_checked_values():
    x = torch.tensor([[2400.0, 600.0, -300.0, 0.0]])
    q, s = Fp8ActQuant("fbgemm", scale_ub=1200.0).quantize(x)
    assert q.float().tolist() == [[448.0, 224.0, -112.0, 0.0]]  # 2400 saturates at the bound 1200
    assert s.item() == (1.0 / (torch.tensor(448.0) / 1200.0)).item()
    q, s = Fp8ActQuant("deepseek", 4).quantize(torch.tensor([[1e-5, -2e-5, 0.0, 0.0]]))
    assert s.item() == pytest.approx(1e-4 / 448) and q.float().tolist() == [[44.0, -88.0, 0.0, 0.0]]
    act = Fp8ActQuant("ct", scale=torch.tensor([0.5]))
    q, s = act.quantize(torch.tensor([[1.0, 300.0, -0.3]]))
    assert q.float().tolist() == [[2.0, 448.0, -0.625]] and s.tolist() == [[0.5]]
    assert act.ct_args == {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}
    assert Fp8ActQuant("fbgemm", scale_ub=1200.0).ct_args is None  # not compressed-tensors' rule


@pytest.mark.parametrize("kw", [dict(recipe="x"), dict(group_size=0), dict(group_size=True), dict(scale_ub=-1.0),
                                dict(scale_ub=float("nan")), dict(scale=torch.tensor([float("nan")])),
                                dict(scale=torch.tensor([0.0])), dict(scale=torch.ones(2)),
                                dict(scale=1.0, group_size=128)])
def test_act_rule_validates(kw):
    with pytest.raises(ValueError):
        Fp8ActQuant(**kw)


# -- CPU emulation ----------------------------------------------------------------------------------
def _layer(out=48, inp=96, block=(1, 96), recipe="ct", act=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    qw = fp8_quantize(w, block, "ct" if recipe == "ct" else "transformers")
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear(qw, b, act_quant=act)


@pytest.mark.parametrize("act", [None, Fp8ActQuant("ct"), Fp8ActQuant("deepseek", 32), Fp8ActQuant("fbgemm", scale_ub=2.0)])
def test_emulated_kernel_is_the_definition(act):
    m = _layer(block=(32, 32), act=act)
    assert m.kernel_name == "fp8-emulated"
    x = torch.randn(2, 5, 96)
    xf = act.fake_quant(x) if act is not None else x
    ref = F.linear(xf, m.quantized_weight.dequantize(), m.bias)
    assert torch.equal(m(x), ref)
    ref_kernel = get_kernel("reference").forward(m, x)  # the generic path: same numbers in fp32
    assert torch.equal(ref_kernel, ref)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16  # computed in fp32 from the bf16 input, cast once at the end
    xb = x.bfloat16()
    ref_b = F.linear(act.fake_quant(xb) if act is not None else xb.float(), m.quantized_weight.dequantize(), m.bias)
    assert torch.equal(yb, ref_b.bfloat16())


# -- CUDA glue, run on CPU ----------------------------------------------------------------------------
def test_scaled_mm_glue_matches_emulation():
    m = _layer(out=64, inp=96, block=(1, 96), act=Fp8ActQuant("ct"))
    x = torch.randn(5, 96)
    xq, xs = m.act_quant.quantize(x)
    try:
        y = fp8_scaled_mm(xq, xs, m.qw_data, m.qw_scale.reshape(1, -1))  # torch._scaled_mm also runs on CPU
    except RuntimeError as e:  # torch < 2.13 on CPU: per-tensor scales only
        if "per-tensor" not in str(e):
            raise
        pytest.skip(f"this torch's CPU _scaled_mm has no row-wise scales ({torch.__version__})")
    assert y.dtype == torch.bfloat16
    exact = (xq.double() * xs.double()) @ (m.qw_data.double() * m.qw_scale.double()).T
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 2 ** -8  # bf16 output rounding
    kern = get_kernel("fp8-scaled-mm")
    for k, v in kern.prepare(m.quantized_weight).items():  # what set_kernel does on a GPU
        m.register_buffer(f"k_{k}", v, persistent=False)
    yk = kern.forward(m, x.unsqueeze(0))
    ref = m(x.unsqueeze(0))
    assert yk.shape == (1, 5, 64) and float((yk - ref).abs().max() / ref.abs().max()) < 2 ** -7
    m.act_quant = None  # weight-only: dequantize-per-call fallback, the definition exactly
    assert torch.equal(kern.forward(m, x), F.linear(x, m.quantized_weight.dequantize()) + m.bias)


def test_cuda_kernels_registered_for_cuda_only():
    cuda = torch.device("cuda")
    sm = get_kernel("fp8-scaled-mm")
    tb = get_kernel("triton-fp8-block")
    assert sm.devices == ("cuda",) == tb.devices and sm.min_capability == (8, 9) == tb.min_capability
    chan = _layer(out=64, inp=96).quantized_weight
    block = _layer(out=64, inp=96, block=(32, 32)).quantized_weight
    assert select_kernel(chan, "cpu")[0].name == "fp8-emulated"
    assert "cuda" in sm.supports(chan, torch.device("cpu")) and "cuda" in tb.supports(block, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert sm.supports(chan, cuda) is None and tb.supports(block, cuda) is None
    assert "block" in sm.supports(block, cuda)
    assert "16" in sm.supports(_layer(out=40, inp=96).quantized_weight, cuda)
    assert "multiple of 32" in tb.supports(_layer(out=40, inp=96, block=(16, 48)).quantized_weight, cuda)
    int8 = QuantLinear(fp8_quantize(torch.randn(8, 8), (1, 8)), kernel="reference").quantized_weight
    assert get_kernel("fp8-emulated").supports(int8, torch.device("cpu")) is None
    from polyquant.methods.rtn import RTNConfig, rtn_quantize
    assert "float8" in get_kernel("fp8-emulated").supports(rtn_quantize(torch.randn(8, 8), RTNConfig(bits=8, group_size=-1)),
                                                           torch.device("cpu"))


# -- Triton block kernel (interpreter) -------------------------------------------------------------------
@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("M,N,K,block,g", [
    (3, 96, 160, (32, 64), 64),     # partial last K tile and activation group, N tiles
    (20, 72, 200, (128, 128), 128),  # one partial weight block in both dims (DeepSeek layout, small)
    (5, 64, 96, (1, 96), None),      # per-channel weights, per-token activations
    (2, 64, 64, (64, 64), None),     # per-tensor
])
def test_triton_block_kernel_matches_definition(interpret, M, N, K, block, g):
    from polyquant.kernels.triton_fp8_block import fp8_block_matmul
    qw = fp8_quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(M)), block, "transformers")
    act = Fp8ActQuant("deepseek", g)
    x = torch.randn(M, K)
    xq, xs = act.quantize(x)
    y = fp8_block_matmul(xq, xs, qw.data, qw.scale, qw.block, g, torch.float32)
    ref = act.fake_quant(x).double() @ qw.dequantize(torch.float64).T
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6  # fp32 accumulation order only
    with pytest.raises(ValueError, match="xs has shape"):
        fp8_block_matmul(xq, xs[:, :1] if xs.shape[1] > 1 else torch.ones(M, 2), qw.data, qw.scale, qw.block, g)


def test_triton_block_kernel_through_quantlinear(interpret):
    m = _layer(out=64, inp=160, block=(32, 64), act=Fp8ActQuant("deepseek", 64), seed=3)
    kern = get_kernel("triton-fp8-block")
    x = torch.randn(2, 3, 160, dtype=torch.bfloat16)
    y = kern.forward(m, x)
    ref = m(x)  # CPU emulation, computed in fp32, cast to bf16
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2 ** -7


@pytest.mark.parametrize("cap,bm,bn", [(90, 16, 64), (89, 64, 128)])
def test_triton_block_kernel_compiles_for_fp8_gpus(cap, bm, bn):
    """The interpreter does not type-check like the compiler: compile ahead to a cubin for sm89 / sm90
    (Triton's bundled LLVM and ptxas; no GPU needed) and check it uses e4m3 tensor-core MMA."""
    triton = pytest.importorskip("triton")
    from triton.compiler import ASTSource
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    from triton.runtime.jit import JITFunction
    from polyquant.kernels import triton_fp8_block as tb
    tb._import_triton()
    fn = JITFunction(tb._fp8_block_kernel)
    consts = dict(UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128)
    sig = {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "y_ptr": "*bf16"}
    sig.update({n: "i32" for n in fn.arg_names if n not in sig and n not in consts})
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 3})
    assert k.asm.get("cubin") and "mma" in k.asm["ptx"] and "e4m3" in k.asm["ptx"]
