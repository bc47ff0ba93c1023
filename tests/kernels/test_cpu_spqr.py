"""cpu-spqr against the reference kernel: shapes that are not multiples of 16, act-order, every SIMD
path this CPU has, decode and prefill, and the layouts it declines."""
from __future__ import annotations

import pytest
import torch

from polyquant.kernels import select_kernel
from polyquant.kernels.cext import library_error
from polyquant.methods.spqr import SpQRConfig, spqr_quantize
from polyquant.nn import QuantLinear
from polyquant.tensor.quantized_weight import QuantizedWeight

pytestmark = pytest.mark.skipif(library_error("spqr") is not None, reason=f"no compiled kernel: {library_error('spqr')}")


def _spqr(out, inp, bits=3, act_order=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    W[torch.rand(out, inp, generator=g) < 0.01] *= 8  # a few heavy weights: outliers in most rows
    X = torch.randn(256, inp, generator=g) * torch.linspace(0.2, 2, inp)
    qw = spqr_quantize(W, SpQRConfig(bits=bits, act_order=act_order), {"H": 2 * X.T @ X / 256, "n": 256})
    assert qw.outliers.nnz > 0
    return qw


@pytest.mark.parametrize("out,inp,bits,act_order", [(48, 100, 3, True), (32, 37, 2, False), (80, 24, 4, True),
                                                    (16, 16, 3, False)])
def test_matches_the_reference_on_odd_shapes(out, inp, bits, act_order):
    from polyquant.kernels import cpu_spqr
    qw = _spqr(out, inp, bits, act_order)
    bias = torch.randn(out)
    ref = QuantLinear(qw, bias, kernel="reference")
    fast = QuantLinear(qw, bias, kernel="cpu-spqr")
    for m in (1, 2, 5, 17):  # the C loop below DEQUANT_MIN_M rows, the dequantized matmul from it
        x = torch.randn(m, inp)
        a, b = ref(x), fast(x)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (m, float((a - b).abs().max()))
    x3 = torch.randn(2, 3, inp)
    assert torch.allclose(ref(x3), fast(x3), rtol=1e-5, atol=1e-4) and fast(x3).shape == (2, 3, out)
    b = cpu_spqr.prepare_spqr(qw)
    perm = b.get("perm")
    dense = qw.dequantize() if perm is None else qw.dequantize()[:, perm]
    x = torch.randn(3, inp)
    xp = torch.zeros(3, b["w"].shape[1] * 2)
    xp[:, :inp] = x if perm is None else x[:, perm]
    for lv in cpu_spqr.simd_levels():
        # the weight values are the reference's exactly; products differ by summation order only
        assert torch.equal(cpu_spqr.spqr_dequantize(b, simd=lv)[:, :inp], dense), lv
        y = cpu_spqr.spqr_mm(xp, b, simd=lv, threads=1)
        assert torch.allclose(y, x @ qw.dequantize().T, rtol=1e-5, atol=1e-4), lv
    assert torch.allclose(cpu_spqr.spqr_mm(xp, b, threads=2), y, rtol=1e-5, atol=1e-5)


def test_auto_picks_it_for_spqr_layers_only():
    qw = _spqr(32, 48)
    k, _ = select_kernel(qw, "cpu")
    assert k.name == "cpu-spqr"
    dense = QuantizedWeight.from_codes(torch.randint(0, 8, (32, 48), dtype=torch.uint8), "uint3", (1, 16),
                                       torch.rand(32, 3), torch.rand(32, 3))
    from polyquant.kernels import get_kernel
    assert "sparse outliers" in get_kernel("cpu-spqr").supports(dense, torch.device("cpu"))
    g32 = QuantizedWeight.from_codes(torch.randint(0, 8, (32, 64), dtype=torch.uint8), "uint3", (1, 32),
                                     torch.rand(32, 2), torch.rand(32, 2))
    from polyquant.tensor.sparse import SparseOutliers
    g32.outliers = SparseOutliers.empty((32, 64))
    with pytest.raises(ValueError, match="groups of 16"):
        select_kernel(g32, "cpu", "cpu-spqr")


def test_gradients_flow_through_the_input():
    qw = _spqr(32, 40)
    fast = QuantLinear(qw, None, kernel="cpu-spqr")
    x = torch.randn(2, 40, requires_grad=True)
    fast(x).sum().backward()
    assert torch.allclose(x.grad, qw.dequantize().sum(0).expand(2, 40), atol=1e-4)
