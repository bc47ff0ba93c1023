"""cpu-int4-actorder: act-order (g_idx) 4-bit layers through the packed CPU int4 op, by sorting
columns by group once and gathering the input per call."""
from __future__ import annotations

import pytest
import torch

from helpers import AUTO_INT4, sqnr_db
from polyquant.kernels.cpu_actorder import group_perm, sort_by_group
from polyquant.nn import QuantLinear
from polyquant.tensor.quantized_weight import QuantizedWeight


def _actorder_weight(out=32, inp=128, gs=32, sym=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[torch.randperm(inp, generator=g)] = (torch.arange(inp) // gs).int()  # GPTQ act-order
    scale = torch.rand(out, inp // gs, generator=g) * 0.02 + 0.001
    zero = None if sym else torch.randint(0, 16, (out, inp // gs), generator=g).float()
    qtype = "int4" if sym else "uint4"
    return QuantizedWeight.from_codes(codes, qtype, (1, gs), scale, zero, g_idx)


def test_sorting_by_group_is_exact():
    qw = _actorder_weight(sym=False)
    sorted_qw, perm = sort_by_group(qw)
    assert sorted_qw.g_idx is None
    assert torch.equal(sorted_qw.dequantize(), qw.dequantize()[:, perm])
    x = torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close(x[:, perm] @ sorted_qw.dequantize(torch.float64).T, x @ qw.dequantize(torch.float64).T)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_actorder_kernel_matches_reference(sym, dtype):
    qw = _actorder_weight(out=48, inp=256, gs=64, sym=sym, seed=1)
    bias = torch.randn(48)
    fast = QuantLinear(qw, bias, kernel="cpu-int4-actorder")  # (auto picks cpu-lut4 on AVX-512 CPUs)
    assert fast.kernel_name == "cpu-int4-actorder"
    ref = QuantLinear(qw, bias, kernel="reference")
    for shape in [(1, 256), (2, 7, 256)]:
        x = torch.randn(*shape).to(dtype)
        y, y_ref = fast(x), ref(x.float())
        assert y.dtype == dtype and y.shape == (*shape[:-1], 48)
        # the op runs in bf16 (activations and scales): measured ~51-53 dB, max error 0.2-0.5% of max|y|
        assert sqnr_db(y_ref, y.float()) > 45
        assert float((y.float() - y_ref).abs().max()) < 0.01 * float(y_ref.abs().max())


def test_irregular_groups_fall_back_to_reference():
    qw = _actorder_weight()
    g = qw.g_idx.clone()
    g[g == 0] = 1  # group 0 empty, group 1 twice as large
    bad = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, g)
    assert isinstance(group_perm(bad), str)
    m = QuantLinear(bad)
    assert m.kernel_name == "reference"
    assert "cpu-int4-actorder" in m.kernel_skipped and "runs of group_size" in m.kernel_skipped["cpu-int4-actorder"]


def test_plain_layers_keep_cpu_int4():
    qw = _actorder_weight()
    plain = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, None)
    assert QuantLinear(plain).kernel_name == AUTO_INT4
