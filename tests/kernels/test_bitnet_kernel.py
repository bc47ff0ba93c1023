"""cpu-ternary: the compiled ternary x int8 kernel, bit-exact in int32 against the integer reference on
random shapes (every code path this CPU runs), the fused BitLinear bit-exact against the PyTorch
formula, the prefill (float GEMM on the codes) path, selection by ``auto`` and agreement with the reference kernel."""
from __future__ import annotations

import pytest
import torch

from polyquant.activations.bitnet import BitNetActivation
from polyquant.kernels import cext
from polyquant.kernels.base import select_kernel
from polyquant.kernels.cpu_ternary import (DENSE_MIN_M, CpuTernaryKernel, pack_ternary, simd_levels, ternary_int_mm,
                                           ternary_linear, ternary_unpack, ternary_unpack_f32,
                                           weight_multiplier)
from polyquant.methods.bitnet import BitNetConfig, bitnet_quantize
from polyquant.nn.quant_linear import QuantLinear

if reason := cext.library_error("ternary"):  # pragma: no cover - every CI machine has a C compiler
    pytest.skip(f"cpu-ternary cannot be built here: {reason}", allow_module_level=True)

SIMD = simd_levels()
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 33, 130), (1, 100, 576), (5, 64, 1536), (2, 4, 64), (9, 13, 200)]


def _codes(n, k, seed):
    return torch.randint(0, 3, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_pack_layout_is_the_documented_byte_order():
    codes = _codes(3, 100, 1)
    p = pack_ternary(codes)
    assert p.shape == (3, 32)  # K padded to 128 with code 1 (weight 0)
    padded = torch.cat([codes, torch.ones(3, 28, dtype=torch.uint8)], 1)
    for blk in range(2):
        for j in range(16):
            c = [padded[:, 64 * blk + 16 * i + j] for i in range(4)]
            assert torch.equal(p[:, 16 * blk + j], c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6)
    assert torch.equal(ternary_unpack(p, 100), codes.to(torch.int8) - 1)
    assert torch.equal(ternary_unpack_f32(p, 100), codes.float() - 1)
    assert torch.equal(ternary_unpack_f32(pack_ternary(codes[:, :64]), 64), codes[:, :64].float() - 1)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int32_products_are_exact(simd, m, n, k):
    codes = _codes(n, k, m * 1000 + n)
    w = pack_ternary(codes)
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    q[0, : min(k, 3)] = -128  # the extremes
    qp = torch.zeros(m, w.shape[1] * 4, dtype=torch.int8)
    qp[:, :k] = q
    ref = (q.long() @ (codes.long() - 1).t()).to(torch.int32)
    assert torch.equal(ternary_int_mm(qp, w, simd=simd), ref)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fused_bitlinear_is_bit_exact(simd, m, n, k):
    codes = _codes(n, k, n)
    w = pack_ternary(codes)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
    x[-1] = 0  # a zero token: the 1e-5 floor
    wf = codes.float() - 1
    for ws in (torch.tensor([1.7]), torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.5):
        q, xs = BitNetActivation.quantize(x)
        want = (q.float() @ wf.t()) / (xs * ws)  # transformers' BitLinear.post_quant_process
        got = ternary_linear(x, w, ws, k, simd=simd)
        assert torch.equal(got, want)


def _layer(n=48, k=96, bias=True, granularity="tensor"):
    g = torch.Generator().manual_seed(4)
    qw = bitnet_quantize(torch.randn(n, k, generator=g) * 0.05, BitNetConfig(granularity=granularity))
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear(qw, b, kernel="auto", act_quant=BitNetActivation())


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_layer_decode_and_prefill_paths_agree_with_the_formula(granularity):
    lin = _layer(granularity=granularity)
    assert lin.kernel_name == "cpu-ternary"
    qw = lin.quantized_weight
    ws = weight_multiplier(qw.scale.reshape(-1))
    wf = qw.codes.float() - 1
    for m in (1, 3, DENSE_MIN_M + 5):
        x = torch.randn(2, m, 96)
        q, xs = BitNetActivation.quantize(x)
        want = (q.float() @ wf.t()) / (xs * ws) + lin.bias
        assert torch.equal(lin(x), want), m
    ref = QuantLinear(qw, lin.bias.data, kernel="reference", act_quant=BitNetActivation())
    x = torch.randn(4, 96)
    torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)


def test_auto_takes_cpu_ternary_only_with_the_bitnet_rule():
    qw = _layer().quantized_weight
    k, _ = select_kernel(qw, "cpu", "auto", act_quant=BitNetActivation())
    assert k.name == "cpu-ternary"
    k, _ = select_kernel(qw, "cpu", "auto", act_quant=None)
    assert k.name != "cpu-ternary"
    group = bitnet_quantize(torch.randn(8, 64) * 0.05, BitNetConfig(granularity="group", group_size=32))
    assert "per tensor or per output row" in CpuTernaryKernel().supports(group, torch.device("cpu"))


def test_gradient_flows_through_the_input():
    lin = _layer(bias=False)
    x = torch.randn(3, 96, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
