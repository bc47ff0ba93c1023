"""The reference kernel: exactly ``F.linear(x, dequantize(W), b)`` for every layout, with the
activation quantizer applied first; QuantLinear's buffers, repr and kernel switching."""
import pytest
import torch
import torch.nn.functional as F

from polyquant.nn import QuantLinear
from polyquant.tensor.quantized_weight import QuantizedWeight


def _qw(qtype, out=24, inp=40, block=(1, 8), asym=False, g_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    from polyquant.qtypes import get_qtype
    qt = get_qtype(qtype)
    grid = (-(-out // block[0]), -(-inp // block[1]))
    scale = torch.rand(grid, generator=g) + 0.1
    if qt.kind == "float":
        codes = (torch.randn(out, inp, generator=g) * 10).to(qt.torch_dtype)
    else:
        codes = torch.randint(0, 2 ** qt.bits, (out, inp), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 2 ** qt.bits, grid, generator=g).float() if asym else None
    return QuantizedWeight.from_codes(codes, qtype, block, scale, zero, g_idx=g_idx)


LAYOUTS = {
    "int3 g8": lambda: _qw("int3"),
    "uint4 g8 asym": lambda: _qw("uint4", asym=True),
    "uint2 per-channel asym": lambda: _qw("uint2", block=(1, 40), asym=True),
    "int8 2-D block": lambda: _qw("int8", block=(16, 16)),
    "nf4 g8": lambda: _qw("nf4"),
    "float8 per-channel": lambda: _qw("float8_e4m3fn", block=(1, 40)),
    "int4 act-order": lambda: _qw("int4", g_idx=torch.randperm(40, generator=torch.Generator().manual_seed(1)) // 8),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_is_dequantize_then_linear(name):
    qw = LAYOUTS[name]()
    bias = torch.randn(24)
    m = QuantLinear(qw, bias, kernel="reference")
    assert m.kernel_name == "reference" and "kernel=reference" in repr(m)
    for shape in ((1, 40), (3, 5, 40)):
        x = torch.randn(*shape)
        y = m(x)
        assert y.shape == (*shape[:-1], 24)
        assert torch.equal(y, F.linear(x, qw.dequantize(), bias))
    xb = torch.randn(2, 40, dtype=torch.bfloat16)
    assert m(xb).dtype == torch.bfloat16
    assert torch.equal(m(xb), F.linear(xb, qw.dequantize(torch.bfloat16), bias.to(torch.bfloat16)))


def test_act_quant_applied_before_matmul():
    qw = _qw("int4")
    m = QuantLinear(qw, None, kernel="reference", act_quant=torch.round)
    x = torch.randn(4, 40) * 3
    assert torch.equal(m(x), F.linear(torch.round(x), qw.dequantize()))
    assert "act-quant" in repr(m)


def test_quant_linear_buffers_and_round_trip_of_weight():
    qw = _qw("uint4", asym=True)
    m = QuantLinear(qw, torch.zeros(24), kernel="reference")
    sd = m.state_dict()
    assert set(sd) == {"qw_data", "qw_scale", "qw_zero", "bias"}  # kernel buffers are not persistent
    back = m.quantized_weight
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.block == qw.block
    assert torch.equal(m.weight, qw.dequantize())
    assert (m.in_features, m.out_features) == (40, 24)
    # an explicit request that the kernel cannot serve is refused with its reason
    with pytest.raises(ValueError, match="unknown kernel"):
        QuantLinear(qw, None, kernel="no-such-kernel")
