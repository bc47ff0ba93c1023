"""bitsandbytes methods (bnb-nf4, bnb-fp4, bnb-int8) and LLM.int8's run-time rule: code books and
rounding on hand-checked blocks, double quantization, the block layout, the int8 x int8 kernel
against its float definition, and - when bitsandbytes is installed - bit-exact codes / absmax /
SCB against bitsandbytes itself."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import sqnr_db
from polyquant.kernels.bnb_int8 import LLMInt8Activation
from polyquant.kernels.int8_dynamic import int8_mm
from polyquant.methods import config_from_dict, get_method
from polyquant.methods.bnb import (BnbFP4Config, BnbInt8Config, BnbNF4Config, bnb_block, bnb_quantize_4bit,
                                   bnb_quantize_int8, code_book, double_quant_absmax, dynamic_map)
from polyquant.nn import QuantLinear


def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


# -- code books -------------------------------------------------------------------------------

def test_code_books_are_bitsandbytes_tables():
    nf4 = code_book("nf4")
    assert nf4[0].item() == -1.0 and nf4[7].item() == 0.0 and nf4[15].item() == 1.0
    assert nf4[8].item() == pytest.approx(0.07958029955625534) and bool((nf4[1:] > nf4[:-1]).all())
    fp4 = code_book("fp4")  # e2m1 bias 2 in bit-pattern order, divided by 12
    raw = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3])
    assert torch.equal(fp4[:8], raw / 12) and torch.equal(fp4[8:], -raw / 12)  # fp32 division, as bnb
    assert math.copysign(1, fp4[8].item()) == -1  # code 8 is -0


def test_dynamic_map_hand_checked():
    m = dynamic_map()
    assert m.shape == (256,) and bool((m[1:] > m[:-1]).all())
    assert m[-1].item() == 1.0 and m[0].item() == pytest.approx(-0.99296875)
    assert (m == 0).sum().item() == 1
    pos = m[m > 0]
    assert pos[0].item() == pytest.approx(0.55e-6)  # 10**-6 * midpoint(0.1, 1)
    assert pos.numel() == 128 and (m < 0).sum().item() == 127  # 1 + 2 + ... + 64 per sign, plus 1.0


def test_nf4_known_block():
    # one block of 64: absmax 2; exact code points, values either side of a midpoint, an exact midpoint
    nf4 = code_book("nf4")
    vals = [2.0 * float(v) for v in nf4]                      # codes 0..15 exactly
    mid = (0.0 + float(nf4[8])) / 2                          # 0.0397901...
    vals += [2 * (mid - 1e-4), 2 * (mid + 1e-4), 2 * mid]     # -> 7, 8, and a tie goes to the lower entry, 7
    vals += [0.0] * (64 - len(vals))
    w = torch.tensor(vals, dtype=torch.float32).reshape(1, 64)
    qw = bnb_quantize_4bit(w, BnbNF4Config())
    assert qw.block == (1, 64) and qw.scale.tolist() == [[2.0]]
    assert qw.codes[0, :19].tolist() == list(range(16)) + [7, 8, 7]
    assert torch.equal(qw.dequantize()[0, :16], 2.0 * nf4)


def test_fp4_codes_follow_bitsandbytes_order():
    w = torch.tensor([[1.0, -0.5, 0.25, 1e-4, -1e-4, 0.0] + [0.0] * 58])
    qw = bnb_quantize_4bit(w, BnbFP4Config())
    # 1.0 -> code 3, -0.5 -> 13, 0.25 -> 7; bitsandbytes gives a tiny positive the code of -0 (8) and a
    # tiny negative the code of +0 (0): both decode to 0
    assert qw.codes[0, :6].tolist() == [3, 13, 7, 8, 0, 0]
    assert qw.dequantize()[0, 3].item() == 0.0


def test_block_layout_and_refusal():
    assert bnb_block((64, 128), 64) == (1, 64)
    assert bnb_block((64, 32), 64) == (2, 32)  # a block is two whole rows
    with pytest.raises(ValueError, match="in_features=96"):
        bnb_block((8, 96), 64)
    w = torch.randn(33, 32)  # 1056 values: 16 full blocks of 64 and a short last block of 32 (one row)
    qw = bnb_quantize_4bit(w, BnbNF4Config())
    assert qw.block == (2, 32) and tuple(qw.scale.shape) == (17, 1)
    assert qw.scale[16, 0].item() == w[32].abs().max().item()
    assert qw.scale[0, 0].item() == w[:2].abs().max().item()


def test_4bit_accuracy_and_zero_block():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, :64] = 0  # an all-zero block dequantizes to zeros
    nf4 = bnb_quantize_4bit(w, BnbNF4Config())
    fp4 = bnb_quantize_4bit(w, BnbFP4Config())
    assert torch.equal(nf4.dequantize()[3, :64], torch.zeros(64))
    # NF4 is the better 4-bit code for normal weights (QLoRA Table 2)
    assert sqnr_db(w, nf4.dequantize()) > 19.5 > sqnr_db(w, fp4.dequantize()) > 16


def test_double_quant():
    torch.manual_seed(1)
    absmax = torch.rand(1000) * 0.1 + 0.05
    dq = double_quant_absmax(absmax)
    assert dq["absmax_q"].dtype == torch.uint8 and dq["absmax_q"].shape == (1000,)
    assert dq["nested_absmax"].shape == (4,)  # ceil(1000 / 256)
    off = absmax.mean()
    assert dq["nested_offset"].item() == off.item()
    c = absmax - off
    assert dq["nested_absmax"][0].item() == c[:256].abs().max().item()
    # dequantized = map[q] * nested + offset, the nearest map entry: error below half the widest map gap
    manual = dynamic_map()[dq["absmax_q"].long()] * dq["nested_absmax"].repeat_interleave(256)[:1000] + off
    assert torch.equal(dq["absmax"], manual)
    assert (dq["absmax"] - absmax).abs().max().item() < 0.5 * 0.0141 * dq["nested_absmax"].max().item() + 1e-7
    # in a QuantizedWeight the dequantized absmax is the scale
    w = torch.randn(32, 128)
    qw = bnb_quantize_4bit(w, BnbNF4Config(double_quant=True))
    assert set(qw.extras) == {"absmax_q", "nested_absmax", "nested_offset", "nested_quant_map"}
    plain = bnb_quantize_4bit(w, BnbNF4Config())
    assert torch.equal(qw.codes, plain.codes)
    assert (qw.scale - plain.scale).abs().max().item() < 0.01 * plain.scale.max().item()


def test_int8_hand_checked():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -3.0]])
    qw = bnb_quantize_int8(w, BnbInt8Config())
    assert qw.qtype == "int8" and qw.block == (1, 3) and qw.zero is None
    cb = qw.codes.to(torch.int16) - 128
    # round half to even: -63.5 -> -64, 63.5 -> 64; 31.75 -> 32; a zero row stays zero
    assert cb.tolist() == [[127, -64, 32], [0, 0, 0], [127, 64, -127]]
    assert qw.extras["SCB"].tolist() == [1.0, 0.0, 3.0]
    assert qw.scale[:, 0].tolist() == pytest.approx([1 / 127, 0.0, 3 / 127])


@pytest.mark.parametrize("cls,kw,field", [(BnbNF4Config, {"blocksize": 48}, "blocksize"),
                                          (BnbFP4Config, {"double_quant": "yes"}, "double_quant"),
                                          (BnbNF4Config, {"compute_dtype": "float64"}, "compute_dtype"),
                                          (BnbInt8Config, {"threshold": -1.0}, "threshold"),
                                          (BnbInt8Config, {"quant_dtype": "bfloat16"}, "quant_dtype")])
def test_config_validation(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(**kw)


def test_registry():
    for name in ("bnb-nf4", "bnb-fp4", "bnb-int8"):
        spec = get_method(name)
        assert spec.default_format == "bitsandbytes" and not spec.needs_calibration
        cfg = spec.config_cls()
        assert config_from_dict(cfg.to_dict()) == cfg
    assert callable(get_method("bnb-int8").act_rule)
    assert BnbFP4Config().quant_type == "fp4" and BnbNF4Config().quant_type == "nf4"


# -- LLM.int8 at run time -----------------------------------------------------------------------

def _int8_layer(out=48, inp=96, seed=0, threshold=6.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) if bias else None
    qw = bnb_quantize_int8(w, BnbInt8Config(threshold=threshold))
    return QuantLinear(qw, b, act_quant=LLMInt8Activation(threshold), method="bnb-int8"), qw, b


def _float_decomposition(x, qw, b, threshold):
    """LLM.int8 written out in float64 from its definition (bitsandbytes' rule, fp16 activations)."""
    a = x.reshape(-1, x.shape[-1]).half().double()
    out = (a.abs() >= threshold).any(0) if 0 < threshold < math.inf else torch.zeros(a.shape[1], dtype=torch.bool)
    a0 = torch.where(a.abs() >= threshold, torch.zeros_like(a), a) if out.any() else a
    sca = a0.abs().amax(1, keepdim=True)
    ca = torch.round(a0 * (127.0 / sca).float().double())
    ca[:, out] = 0
    cb = qw.codes.double() - 128
    scb = qw.extras["SCB"].double()
    y = (ca @ cb.t()) * sca * scb / 127 ** 2
    wdeq = qw.dequantize().double()
    y = y + x.reshape(-1, x.shape[-1]).double()[:, out] @ wdeq[:, out].t()
    return y + (b.double() if b is not None else 0)


def test_kernel_is_selected_and_rule_finds_outlier_columns():
    ql, qw, b = _int8_layer()
    assert ql.kernel_name == "llm-int8"
    x = torch.randn(4, 96)
    x[1, 5] = 6.0      # exactly the threshold: an outlier (bitsandbytes uses >=)
    x[2, 9] = -7.5
    x[0, 11] = 5.99    # below
    ca, sca, cols = ql.act_quant.quantize(x)
    assert cols.tolist() == [5, 9]
    assert (ca[:, cols] == 0).all()
    assert sca[1].item() == x[1, [i for i in range(96) if i != 5]].abs().max().half().float().item()


def test_threshold_inf_is_the_pure_int8_path():
    ql, qw, b = _int8_layer(threshold=math.inf)
    x = torch.randn(3, 7, 96) * 3
    x[..., 4] *= 10  # large values, but no decomposition
    y = ql(x)
    x2 = x.reshape(-1, 96).half()
    sca = x2.abs().amax(1).float()
    ca = torch.round(x2 * (127.0 / sca).unsqueeze(-1)).to(torch.int8)
    cb = (qw.codes.to(torch.int16) - 128).to(torch.int8)
    acc = (ca.long() @ cb.long().t())  # exact integer product
    pure = acc.float() * (sca.unsqueeze(-1) * qw.extras["SCB"].unsqueeze(0)) * (1.0 / 127 ** 2) + b
    assert torch.equal(y.reshape(-1, 48), pure)
    zero, _, _ = _int8_layer(threshold=0.0)  # 0 also disables the decomposition (bitsandbytes' convention)
    assert torch.equal(zero(x), y)


def test_decomposition_matches_float_definition():
    ql, qw, b = _int8_layer(threshold=6.0)
    torch.manual_seed(2)
    x = torch.randn(2, 5, 96)
    x[..., 3] *= 30
    x[1, 2, 70] = -12.0
    y = ql(x).double().reshape(-1, 48)
    ref = _float_decomposition(x, qw, b, 6.0)
    assert (y - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    # the reference kernel (fake-quantized activations @ dequantized weight) agrees
    ql.set_kernel("reference")
    yr = ql(x).double().reshape(-1, 48)
    assert (yr - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    # and the decomposition matters: without it the outlier column wrecks the int8 rows
    plain, _, _ = _int8_layer(threshold=math.inf)
    yp = plain(x).double().reshape(-1, 48)
    exact = x.reshape(-1, 96).double() @ qw.dequantize().double().t() + b.double()
    assert (y - exact).abs().mean() < 0.5 * (yp - exact).abs().mean()


def test_int8_mm_exact_for_long_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.full((3, 1536), 127, dtype=torch.int8)
    a[1] = torch.randint(-127, 128, (1536,), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 1536), generator=g, dtype=torch.int8)
    b[0] = 127
    ref = a.long() @ b.long().t()
    assert torch.equal(int8_mm(a, b).long(), ref)
    assert ref[0, 0].item() == 127 * 127 * 1536 > 2 ** 24  # beyond exact fp32 accumulation


def test_weight_only_use_of_the_layout():
    ql, qw, b = _int8_layer()
    ql.act_quant = None
    x = torch.randn(3, 96)
    assert torch.allclose(ql(x), torch.nn.functional.linear(x, qw.dequantize(), b), atol=1e-6)


# -- against bitsandbytes -------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 256), (48, 64), (33, 32), (30, 192)])
def test_4bit_codes_and_absmax_bit_exact_vs_bitsandbytes(quant_type, shape):
    F = _bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    torch.manual_seed(3)
    w = torch.randn(shape) * 0.03
    w[0, :8] = 0
    w[1, 1] = 1e-8
    cfg = BnbNF4Config() if quant_type == "nf4" else BnbFP4Config()
    qw = bnb_quantize_4bit(w, cfg)
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    c = qw.codes.reshape(-1)
    c = torch.cat([c, c.new_zeros(c.numel() % 2)])
    assert torch.equal(((c[0::2] << 4) | c[1::2]).unsqueeze(1), packed)
    assert torch.equal(qw.scale.reshape(-1), st.absmax)
    deq = _dequantize_4bit_compute(packed.reshape(-1), st.absmax, st.code, 64, shape, torch.float32)
    assert torch.equal(qw.dequantize(), deq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_vs_bitsandbytes(quant_type):
    F = _bnb()
    torch.manual_seed(4)
    w = torch.randn(96, 1024) * 0.02  # 1536 blocks -> 6 nested blocks
    cfg = (BnbNF4Config if quant_type == "nf4" else BnbFP4Config)(double_quant=True)
    qw = bnb_quantize_4bit(w, cfg)
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    assert torch.equal(qw.extras["nested_absmax"], st.state2.absmax)
    assert qw.extras["nested_offset"].item() == st.offset.item()
    # bitsandbytes' C++ CPU quantizer finds the nearest map entry with an approximate search, so a
    # value within float noise of a midpoint can take the neighbour; polyquant rounds exactly (as
    # bitsandbytes' PyTorch backend does). Allow that, and only that.
    diff = (qw.extras["absmax_q"].long() - st.absmax.long())
    assert diff.abs().max().item() <= 1 and (diff != 0).float().mean().item() < 0.01
    ref_absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    gap = 0.0141 * st.state2.absmax.max().item()  # widest step of the dynamic map, scaled
    assert (qw.scale.reshape(-1) - ref_absmax).abs().max().item() <= gap
    same = diff == 0
    assert torch.equal(qw.scale.reshape(-1)[same], ref_absmax[same])


def test_int8_codes_and_scb_bit_exact_vs_bitsandbytes():
    F = _bnb()
    torch.manual_seed(5)
    w = torch.randn(64, 160) * 0.05
    w[7] = 0
    qw = bnb_quantize_int8(w, BnbInt8Config())
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    assert torch.equal((qw.codes.to(torch.int16) - 128).to(torch.int8), cb)
    assert torch.equal(qw.extras["SCB"], scb)


def test_llm_int8_rule_and_output_vs_bitsandbytes():
    F = _bnb()
    import bitsandbytes as bnb
    ql, qw, b = _int8_layer(out=48, inp=96, threshold=6.0)
    torch.manual_seed(6)
    x = torch.randn(5, 96)
    x[:, 7] *= 20
    x[2, 40] = 6.0
    ca, sca, cols = ql.act_quant.quantize(x)
    CA, SCA, oc = F.int8_vectorwise_quant(x.half(), threshold=6.0)
    assert torch.equal(ca, CA) and torch.equal(sca, SCA) and torch.equal(cols, oc)
    lin = bnb.nn.Linear8bitLt(96, 48, has_fp16_weights=False, threshold=6.0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    lin.bias = torch.nn.Parameter(b.clone())
    lin = lin.to("cpu").eval()
    with torch.no_grad():
        yb = lin(x)
    # bitsandbytes' PyTorch backend rescales with the literal 6.200124e-05 (1/127**2 is 6.2000124e-05):
    # a 1.8e-5 relative offset on the int8 part; polyquant uses 1/127**2
    y = ql(x)
    assert (y - yb).abs().max().item() < 5e-5 * y.abs().max().item()
