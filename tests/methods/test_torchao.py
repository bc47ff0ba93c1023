"""torchao recipes: hand-computed codes/scales/zeros, config validation, kernels on tiny models,
and (with torchao installed) bit-exact agreement with torchao's own quantizers."""
from __future__ import annotations

import re

import pytest
import torch

import polyquant
from helpers import AUTO_INT4, sqnr_db, tiny_llama
from polyquant.methods.torchao import (TorchAOFloat8Config, TorchAOInt4Config, TorchAOInt8Config,
                                       TorchAOInt8DynamicConfig, torchao_float8_weight, torchao_int4_weight,
                                       torchao_int8_weight)
from polyquant.nn.quantize import kernel_summary, set_kernels

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def test_int4_hand_computed():
    # one group of 32: min -1, max 2 -> scale 3/15 = 0.2, float zero = -1 + 8*0.2 = 0.6;
    # values on the grid -1 + 0.2*j get code j; the code-domain zero is 8 - 0.6/0.2 = 5
    j = torch.tensor([0, 15, 5, 8, 3] + [7] * 27)
    w = (-1.0 + 0.2 * j.float()).reshape(1, 32)
    qw = torchao_int4_weight(w, 32)
    assert qw.qtype == "uint4" and qw.block == (1, 32)
    assert qw.codes[0].tolist() == j.tolist()
    assert qw.scale.item() == pytest.approx(0.2, rel=1e-6)
    assert qw.zero.dtype == torch.float64 and qw.zero.item() == pytest.approx(5.0, abs=1e-6)
    # torchao's stored zero comes back exactly from the code-domain zero
    z = ((8 - qw.zero) * qw.scale.double()).to(torch.float32)
    assert z.item() == pytest.approx(0.6, rel=1e-6)
    assert torch.allclose(qw.dequantize(), w, atol=1e-6)


def test_int4_scale_and_zero_follow_the_weight_dtype():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qw = torchao_int4_weight(w, 32)
    assert qw.scale.dtype == torch.bfloat16
    # scale and zero are computed in float32, then cast to bf16 (mslk int4_row_quantize_zp)
    x = w.float().reshape(16, 2, 32)
    mn, mx = x.amin(-1), x.amax(-1)
    s32 = (mx - mn).clamp(min=1e-6) / 15
    assert torch.equal(qw.scale, s32.to(torch.bfloat16))
    # the zero point torchao stores (bf16) comes back exactly from the code-domain zero
    assert torch.equal(((8 - qw.zero) * qw.scale.double()).to(torch.bfloat16), (mn + s32 * 8).to(torch.bfloat16))


def test_int8_hand_computed():
    w = torch.tensor([[1.275, -0.5, 0.3333, 0.0], [0.0, 0.0, 0.0, 0.0]])
    qw = torchao_int8_weight(w)
    assert qw.qtype == "int8" and qw.block == (1, 4) and qw.scale.dtype == torch.float32
    assert qw.scale[0, 0].item() == pytest.approx(0.01, rel=1e-6)
    assert qw.scale[1, 0].item() == torch.finfo(torch.float32).eps  # clamped
    assert (qw.codes.to(torch.int16) - 128).tolist() == [[127, -50, 33, 0], [0, 0, 0, 0]]
    t = torchao_int8_weight(w, "tensor")
    assert t.block == (2, 4) and t.scale.shape == (1, 1)


def test_float8_hand_computed():
    w = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    qw = torchao_float8_weight(w)
    assert qw.qtype == "float8_e4m3fn" and qw.scale[0, 0].item() == pytest.approx(2 / 448)
    assert qw.codes.float()[0].tolist() == [448.0, -224.0, 112.0, 0.0]
    assert qw.codes.float()[1].tolist() == [0.0] * 4 and qw.scale[1, 0].item() == 0.0  # no NaN codes
    assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("kwargs,field", [
    (dict(cls=TorchAOInt4Config, group_size=96), "group_size"),
    (dict(cls=TorchAOInt8Config, granularity="col"), "granularity"),
    (dict(cls=TorchAOInt8DynamicConfig, granularity="group"), "granularity"),
    (dict(cls=TorchAOFloat8Config, activations="int8"), "activations"),
    (dict(cls=TorchAOFloat8Config, activation_value_ub=10.0), "activation_value_ub"),
    (dict(cls=TorchAOFloat8Config, activations="float8", activation_value_lb=-1.0), "activation_value_lb"),
])
def test_bad_configs_name_the_field(kwargs, field):
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_float8_granularity_defaults_follow_torchao():
    assert TorchAOFloat8Config().granularity == "row"
    assert TorchAOFloat8Config(activations="float8").granularity == "tensor"


def test_int4_version1_codes_follow_the_rounded_scale_and_zero():
    # bf16 weights: version 1 computes in bf16 and takes codes against zero - 8*scale of the stored
    # (rounded) values; version 2 in float32 against the exact min. Both dequantize (u - 8)*s + z.
    w = (torch.randn(32, 128, generator=torch.Generator().manual_seed(6)) * 0.05).to(torch.bfloat16)
    v1, v2 = torchao_int4_weight(w, 64, version=1), torchao_int4_weight(w, 64)
    x = w.reshape(32, 2, 64)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = torch.clamp((mx - mn) / 15.0, min=1e-6)
    z = mn + s * 8.0
    u = torch.clamp(torch.round((x - (z - s * 8.0)) / s), 0, 15).reshape(32, 128)
    assert torch.equal(v1.codes, u.to(torch.uint8)) and torch.equal(v1.scale, s.squeeze(-1))
    assert v1.scale.dtype == v2.scale.dtype == torch.bfloat16
    assert (v1.codes != v2.codes).any()  # the two rules really differ on bf16 weights
    assert TorchAOInt4Config(group_size=64, version=1).describe() == "torchao int4 g64 v1"
    with pytest.raises(ValueError, match="version"):
        TorchAOInt4Config(version=3)


def test_int4_group_must_divide_in_features():
    m = tiny_llama()  # in_features 64 and 128
    with pytest.raises(ValueError, match="group_size 128 does not divide in_features 64"):
        polyquant.quantize(m, TorchAOInt4Config(), show_progress=False)


@pytest.mark.parametrize("cfg,kernel,min_sqnr", [
    (TorchAOInt4Config(group_size=32), AUTO_INT4, 10),
    (TorchAOInt8Config(), "cpu-int8", 25),
    (TorchAOInt8DynamicConfig(), "int8-dynamic", 20),
    (TorchAOFloat8Config(), None, 20),  # whichever float8 kernel is registered
    (TorchAOFloat8Config(activations="float8"), None, 15),
], ids=["int4", "int8", "int8dyn", "fp8", "fp8dyn"])
def test_tiny_llama_kernels(cfg, kernel, min_sqnr):
    m = tiny_llama()
    with torch.no_grad():
        ref = m(X).logits
        q = polyquant.quantize(m, cfg, show_progress=False)
        if kernel is not None:
            assert set(kernel_summary(q)) == {kernel}
        y = q(X).logits
        set_kernels(q, "reference")
        y_ref = q(X).logits
    assert sqnr_db(ref, y) > min_sqnr
    # the fast kernel computes the reference kernel's sum (bf16 activations for cpu-int4/int8)
    assert sqnr_db(y_ref, y) > 30


def test_quantized_weight_dequantizes_to_the_torchao_formula():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    qw = torchao_int4_weight(w, 32)
    s = qw.scale.repeat_interleave(32, 1)
    z = ((8 - qw.zero) * qw.scale.double()).float().repeat_interleave(32, 1)
    torchao_deq = (qw.codes.float() - 8) * s + z
    assert torch.allclose(qw.dequantize(), torchao_deq, atol=1e-6, rtol=0)


# -- against torchao itself -----------------------------------------------------------------
def _torchao(min_version: tuple[int, int] = (0, 15)):
    """torchao, or a skip: ``min_version`` 0.16 for the int8 rules polyquant reproduces (torchao 0.15's
    ``Int8Tensor`` rounds bf16 weights differently; 0.16+ - checked with 0.18 - is bit-exact)."""
    ao = pytest.importorskip("torchao", reason="torchao is not installed (tests against the library skipped)")
    try:
        from torchao.quantization import Float8Tensor, Int8Tensor, PerRow, PerTensor  # noqa: F401
    except ImportError:
        pytest.skip(f"torchao {ao.__version__} has no Int8Tensor / Float8Tensor (needs >= 0.15)")
    have = tuple(int(p) for p in re.findall(r"\d+", ao.__version__)[:2])
    if have < min_version:
        pytest.skip(f"torchao {ao.__version__}: this rule is torchao >= {'.'.join(map(str, min_version))}'s")
    return ao


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gran", ["row", "tensor"])
def test_int8_and_float8_bit_exact_vs_torchao(dtype, gran):
    _torchao((0, 16))
    from torchao.quantization import Float8Tensor, Int8Tensor, PerRow, PerTensor
    g = PerRow() if gran == "row" else PerTensor()
    w = (torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    ref = Int8Tensor.from_hp(w, g)
    qw = torchao_int8_weight(w, gran)
    assert torch.equal((qw.codes.to(torch.int16) - 128).to(torch.int8), ref.qdata)
    assert torch.equal(qw.scale, ref.scale.reshape(qw.scale.shape))
    ref8 = Float8Tensor.from_hp(w, torch.float8_e4m3fn, g)
    q8 = torchao_float8_weight(w, gran)
    assert torch.equal(q8.codes.view(torch.uint8), ref8.qdata.view(torch.uint8))
    assert torch.equal(q8.scale, ref8.scale.reshape(q8.scale.shape))


def test_int4_matches_torchao_tinygemm_primitives_in_float32():
    """The default ``plain`` Int4Tensor quantizes with mslk's ``int4_row_quantize_zp`` (not installable
    without CUDA); in float32 torchao's tinygemm primitives compute the same scale/zero/codes."""
    _torchao()
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, (1, 64), torch.int32, 0, 15, 1e-6,
                                           torch.float32, torch.float32)
    q = _quantize_affine_tinygemm(w, (1, 64), s, z, torch.int32, 0, 15)
    qw = torchao_int4_weight(w, 64)
    assert torch.equal(qw.codes.to(torch.int32), q)
    assert torch.equal(qw.scale, s.reshape(qw.scale.shape))
    assert torch.equal(((8 - qw.zero) * qw.scale.double()).float(), z.reshape(qw.scale.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_version1_bit_exact_vs_torchao_tinygemm_cpu_layout(dtype):
    """``version=1``: torchao 0.15's version-1 rule with ``Int4CPULayout`` (scale and zero in the weight's
    dtype, every step computed in it)."""
    _torchao()
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm)
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, (1, 64), torch.int32, 0, 15, 1e-6,
                                           None, dtype)
    q = _quantize_affine_tinygemm(w, (1, 64), s, z, torch.int32, 0, 15)
    qw = torchao_int4_weight(w, 64, version=1)
    assert torch.equal(qw.codes.to(torch.int32), q)
    assert qw.scale.dtype == dtype and torch.equal(qw.scale, s.reshape(qw.scale.shape))
    assert torch.equal(((8 - qw.zero) * qw.scale.double()).to(dtype), z.reshape(qw.scale.shape))


def test_int8_dynamic_linear_equals_torchao():
    _torchao((0, 16))
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    lin = torch.nn.Linear(128, 64)
    torch.nn.init.normal_(lin.weight, std=0.05)
    ours = polyquant.quantize(torch.nn.Sequential(lin), TorchAOInt8DynamicConfig(include=["0"]),
                              show_progress=False)
    theirs = torch.nn.Sequential(torch.nn.Linear(128, 64))
    theirs.load_state_dict({"0.weight": lin.weight.data, "0.bias": lin.bias.data})
    quantize_(theirs, Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("fn", [lambda w: torchao_int4_weight(w, 32), torchao_int8_weight, torchao_float8_weight],
                         ids=["int4", "int8", "fp8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(fn, bad):
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(w)


# -- the fast paths are the plain formulas, bit for bit (these run without torchao) -------------------
def _weights(dtype):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[3] = 0.0                                    # an all-zero row
    w[5] = torch.randn(256, generator=g) * 1e-6   # a tiny row (fp16: subnormal scale)
    w[7, :4] = torch.tensor([3.0, -3.0, 1e-9, -0.0])
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_version1_fast_path_equals_the_formula(dtype):
    w = _weights(dtype)
    x = w.reshape(48, 4, 64)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)   # in the weight's dtype
    scale = torch.clamp((mx - mn) / 15.0, min=1e-6)
    zero = mn + scale * 8.0
    u = torch.clamp(torch.round((x - (zero - scale * 8.0)) / scale), 0, 15).to(torch.uint8).reshape(48, 256)
    qw = torchao_int4_weight(w, 64, version=1)
    assert torch.equal(qw.codes, u)
    assert torch.equal(qw.scale, scale.squeeze(-1))
    assert torch.equal(((8 - qw.zero) * qw.scale.double()).to(dtype), zero.squeeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_codes_equal_the_formula(dtype):
    w = _weights(dtype)
    lo = torch.minimum(w.amin(1, keepdim=True), torch.zeros(1, dtype=dtype))
    hi = torch.maximum(w.amax(1, keepdim=True), torch.zeros(1, dtype=dtype))
    scale = torch.clamp(torch.maximum(-lo, hi) / 127.5, min=torch.finfo(torch.float32).eps).float()
    q = torch.clamp(torch.round(w * (1.0 / scale)), -128, 127)
    qw = torchao_int8_weight(w)
    assert torch.equal(qw.codes, (q + 128).to(torch.uint8)) and torch.equal(qw.scale, scale)
    # the kernels' signed int8 weight (code - 128, taken with a sign-bit flip) is q
    for kern in ("cpu-int8", "int8-dynamic"):
        from polyquant.kernels import KERNELS
        assert torch.equal(KERNELS[kern].prepare(qw)["w"], q.to(torch.int8))


def test_e4m3fn_decode_equals_torchs_cast_for_every_code():
    from polyquant.qtypes import e4m3fn_to_float32
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref = codes.to(torch.float32)
    finite = ~ref.isnan()
    ours = e4m3fn_to_float32(codes[finite])   # every finite code, -0.0 and subnormals included
    assert torch.equal(ours.view(torch.int32), ref[finite].view(torch.int32))
    grid = codes[finite][torch.randint(0, int(finite.sum()), (37, 41), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(e4m3fn_to_float32(grid).view(torch.int32), grid.float().view(torch.int32))
    got = e4m3fn_to_float32(codes)            # NaN codes present: torch's own cast, NaN kept
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[finite], ref[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float8_codes_equal_the_clamped_formula(dtype):
    w = _weights(dtype)
    amax = w.abs().amax(1, keepdim=True)
    scale = (amax / 448.0).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    ref = (w.to(torch.float32) / safe).clamp(-448, 448).to(torch.float8_e4m3fn)
    qw = torchao_float8_weight(w)
    assert torch.equal(qw.scale, scale)
    assert torch.equal(qw.codes.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(qw.dequantize(), ref.float() * scale)
    # quotients above 448 (a scale too small for its dtype to bound them) come out at the clamp, 448
    from polyquant.kernels.float8 import float8_codes
    x = torch.tensor([[1.0, -1.0]])
    s = torch.tensor([[1e-3]])
    assert float8_codes(x, s, torch.float32).float().tolist() == [[448.0, -448.0]]
    assert float8_codes(x, s, torch.bfloat16).float().tolist() == [[448.0, -448.0]]


def test_fp8_emulated_builds_its_fp32_weight_on_the_first_forward():
    m = tiny_llama()
    q = polyquant.quantize(m, TorchAOFloat8Config(), show_progress=False)
    lins = [mod for mod in q.modules() if isinstance(mod, polyquant.nn.quant_linear.QuantLinear)]
    assert {mod.kernel_name for mod in lins} == {"fp8-emulated"}
    assert all(getattr(mod, "k_w", None) is None for mod in lins)   # nothing built by quantize
    with torch.inference_mode():
        y = q(X).logits
    for mod in lins:
        w = mod.k_w
        assert w.dtype == torch.float32 and not w.is_inference()   # usable outside inference mode too
        assert torch.equal(w, mod.quantized_weight.dequantize(torch.float32))
    with torch.no_grad():
        assert torch.equal(q(X).logits, y)
    set_kernels(q, "auto")                       # re-selection drops the cache; the next forward rebuilds it
    assert all(getattr(mod, "k_w", None) is None for mod in lins)
    x = torch.randn(2, lins[0].in_features, requires_grad=True)
    lins[0](x).sum().backward()                  # gradients flow to the input through the cached weight
    assert x.grad is not None and x.grad.shape == x.shape
