"""int8-dynamic: torchao's per-token int8 activation rule, the exact int8 x int8 product and the
kernel against an exact integer emulation, the fake-quant reference kernel and the float layer."""
from __future__ import annotations

import pytest
import torch

from helpers import sqnr_db
from polyquant.kernels.int8_dynamic import Int8DynamicActivation, int8_mm, int8_symmetric_scale
from polyquant.methods.torchao import torchao_int8_weight
from polyquant.nn.quant_linear import QuantLinear


def _layer(out=64, inp=96, bias=True, kernel="auto", act=True, gran="row", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    qw = torchao_int8_weight(w, gran)
    return w, b, QuantLinear(qw, b, kernel=kernel, act_quant=Int8DynamicActivation(gran) if act else None)


@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (17, 64, 64), (3, 13, 7), (5, 1536, 40)])
def test_int8_mm_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    out = int8_mm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long().t())


def test_activation_rule_hand_computed():
    # absmax 1.275 -> scale 1.275 / 127.5 = 0.01; 0.5 -> 50, -0.333 -> -33.3 -> -33, 0.1234 -> 12,
    # the absmax itself -> 127.5 -> 128 -> clamped to 127
    x = torch.tensor([[0.5, -0.333, 0.1234, 1.275]])
    q, s = Int8DynamicActivation().quantize(x)
    assert s.dtype == torch.float32 and s.shape == (1, 1)
    assert s.item() == pytest.approx(0.01, rel=1e-6)
    assert q.tolist() == [[50, -33, 12, 127]]
    # per token: each row its own scale; an all-zero row gets the float32 eps as scale, codes 0
    x2 = torch.tensor([[1.275, 0.0], [0.0, 0.0], [-2.55, 0.0]])
    q2, s2 = Int8DynamicActivation().quantize(x2)
    assert s2[1, 0].item() == torch.finfo(torch.float32).eps and q2[1].tolist() == [0, 0]
    assert s2[2, 0].item() == pytest.approx(0.02, rel=1e-6) and q2[0, 0].item() == 127
    # per tensor: one scale (the largest |x|)
    _, st = Int8DynamicActivation("tensor").quantize(x2)
    assert st.shape == (1, 1) and st.item() == pytest.approx(0.02, rel=1e-6)


def test_scale_is_computed_in_the_input_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    s = int8_symmetric_scale(x, (-1,))
    want = (x.abs().amax(dim=-1, keepdim=True) / 127.5).to(torch.float32)  # bf16 division, then f32
    assert s.dtype == torch.float32 and torch.equal(s, want)


@pytest.mark.parametrize("gran", ["row", "tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_exact_integer_emulation(gran, bias):
    _, b, lay = _layer(bias=bias, gran=gran)
    assert lay.kernel_name == "int8-dynamic"
    x = torch.randn(2, 5, 96)
    rule = lay.act_quant
    q, xs = rule.quantize(x.reshape(-1, 96))
    wq = (lay.quantized_weight.codes.to(torch.int16) - 128).long()
    acc = q.long() @ wq.t()  # exact integer accumulation
    want = (acc.to(torch.float32) * xs) * lay.quantized_weight.scale.reshape(-1)
    if b is not None:
        want = want + b
    assert torch.equal(lay(x), want.reshape(2, 5, 64))


def test_kernel_agrees_with_fake_quant_reference_and_float():
    w, b, fast = _layer()
    ref = QuantLinear(fast.quantized_weight, b, kernel="reference", act_quant=Int8DynamicActivation())
    x = torch.randn(7, 96)
    y_fast, y_ref = fast(x), ref(x)
    # same sum, integer vs float32 accumulation
    assert (y_fast - y_ref).abs().max().item() <= 1e-5 * y_ref.abs().max().item()
    # int8 x int8 against the float layer on Gaussian data
    assert sqnr_db(torch.nn.functional.linear(x, w, b), y_fast) > 30


def test_bfloat16_input_follows_torchao_order():
    _, b, lay = _layer()
    x = torch.randn(3, 96).to(torch.bfloat16)
    y = lay(x)
    assert y.dtype == torch.bfloat16
    q, xs = lay.act_quant.quantize(x)
    acc = (q.long() @ (lay.quantized_weight.codes.to(torch.int16) - 128).long().t()).to(torch.float32)
    want = ((acc * xs).to(torch.bfloat16) * lay.quantized_weight.scale.reshape(-1) + b).to(torch.bfloat16)
    assert torch.equal(y, want)


def test_auto_selection_needs_the_activation_rule():
    _, _, with_rule = _layer()
    _, _, weight_only = _layer(act=False)
    assert with_rule.kernel_name == "int8-dynamic"
    assert weight_only.kernel_name == "cpu-int8"
    assert "int8-dynamic" not in weight_only.kernel_skipped  # another computation, not a faster kernel passed over
    # explicitly requested without the rule: weight-only, equal to the reference kernel
    w, b, forced = _layer(act=False, kernel="int8-dynamic")
    ref = QuantLinear(forced.quantized_weight, b, kernel="reference")
    x = torch.randn(4, 96)
    assert torch.allclose(forced(x), ref(x), atol=1e-6, rtol=0)


def test_refuses_layouts_it_cannot_run():
    from polyquant.kernels import get_kernel
    from polyquant.tensor.quantized_weight import QuantizedWeight
    k = get_kernel("int8-dynamic")
    codes = torch.randint(0, 256, (16, 32), dtype=torch.uint8)
    asym = QuantizedWeight.from_codes(codes, "uint8", (1, 32), torch.ones(16, 1), torch.full((16, 1), 128.0))
    grouped = QuantizedWeight.from_codes(codes, "int8", (1, 16), torch.ones(16, 2))
    assert "signed 8-bit" in k.supports(asym, torch.device("cpu"))
    assert "per-channel or per-tensor" in k.supports(grouped, torch.device("cpu"))
    with pytest.raises(ValueError, match="granularity"):
        Int8DynamicActivation("group")
