"""optimum-quanto recipe: hand-computed codes/scales/shifts, quanto's group-size rule, config
validation, static activation calibration, and (with optimum-quanto installed) bit-exact agreement
with the library and its activation numerics."""
from __future__ import annotations

import warnings

import pytest
import torch

import polyquant
from helpers import AUTO_INT4, sqnr_db, tiny_llama
from polyquant.activations.quanto import QuantoActivation
from polyquant.calibration.activations import calibrate_activations
from polyquant.methods.quanto import QuantoConfig, quanto_group_size, quanto_quantize
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import kernel_summary

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
CAL = [torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_int4_hand_computed():
    # in_features 4 <= 128: one group per row. min -1, max 2 -> scale 3/15 = 0.2, shift 1;
    # u = round((w + 1) / 0.2): -1 -> 0, 0.6 -> 8, 2 -> 15, 0 -> 5; code-domain zero = shift/scale = 5
    w = torch.tensor([[-1.0, 0.6, 2.0, 0.0]])
    qw = quanto_quantize(w, QuantoConfig(bits=4))
    assert qw.qtype == "uint4" and qw.block == (1, 4)
    assert qw.codes.tolist() == [[0, 8, 15, 5]]
    assert qw.scale.item() == pytest.approx(0.2, rel=1e-6)
    assert qw.zero.item() == pytest.approx(5.0, rel=1e-6)
    assert torch.equal((qw.zero * qw.scale.double()).float(), torch.tensor([[1.0]]))  # the shift, exactly


def test_int2_and_int8_hand_computed():
    q2 = quanto_quantize(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), QuantoConfig(bits=2))
    assert q2.codes.tolist() == [[0, 1, 2, 3]] and q2.scale.item() == 1.0 and q2.zero.item() == 1.0
    q8 = quanto_quantize(torch.tensor([[1.27, -0.5, 0.0, 0.33]]), QuantoConfig(bits=8))
    assert q8.qtype == "int8" and q8.scale.item() == pytest.approx(0.01, rel=1e-6)
    assert (q8.codes.to(torch.int16) - 128).tolist() == [[127, -50, 0, 33]]
    f8 = quanto_quantize(torch.tensor([[448.0, -112.0, 0.0, 1.0]]), QuantoConfig(weights="qfloat8"))
    assert f8.qtype == "float8_e4m3fn" and f8.scale.item() == 1.0
    assert f8.codes.float().tolist() == [[448.0, -112.0, 0.0, 1.0]]


def test_constant_group_keeps_its_value():
    w = torch.full((2, 8), 0.25)
    w[1] = -3.0
    qw = quanto_quantize(w, QuantoConfig(bits=4))
    assert torch.equal(qw.dequantize(), w) and bool((qw.scale == 1).all())


@pytest.mark.parametrize("k,want", [(576, 96), (1536, 128), (256, 128), (160, 32), (64, None), (128, None),
                                    (130, None)])
def test_group_size_rule(k, want):
    assert quanto_group_size(k) == want


def test_grouping_on_a_real_shape():
    w = torch.randn(32, 576, generator=torch.Generator().manual_seed(0))
    qw = quanto_quantize(w, QuantoConfig(bits=4))
    assert qw.block == (1, 96) and qw.scale.shape == (32, 6)
    assert sqnr_db(w, qw.dequantize()) > 15


@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=3), "bits"), (dict(weights="qint3"), "weights"), (dict(activations="int16"), "activations"),
    (dict(bits=8, weights="qint4"), "bits"), (dict(group_size=0), "group_size"), (dict(momentum=1.0), "momentum"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantoConfig(**kwargs)


def test_config_resolves_bits_and_weights():
    assert QuantoConfig().weights == "qint4" and QuantoConfig().bits == 4
    assert QuantoConfig(bits=8).weights == "qint8"
    assert QuantoConfig(weights="qfloat8").bits == 8
    assert polyquant.config_from_dict(QuantoConfig(bits=2).to_dict()) == QuantoConfig(bits=2)


def test_weight_only_model_kernels():
    m = tiny_llama()
    with torch.no_grad():
        ref = m(X).logits
        for cfg, kern, sq in ((QuantoConfig(bits=8), "cpu-int8", 25), (QuantoConfig(bits=4), AUTO_INT4, 8),
                              (QuantoConfig(bits=2), AUTO_INT4, 0)):  # 2-bit codes ride on the int4 op
            q = polyquant.quantize(m, cfg, show_progress=False)
            assert set(kernel_summary(q)) == {kern}
            assert sqnr_db(ref, q(X).logits) > sq


def test_static_int8_activations_run_int8_x_int8():
    """qint8 activations on int8 weights: ``quanto-int8`` computes quanto's CPU product (int32 sums of the
    codes, times s_x * s_w); qfloat8 activations fall back to the cpu-int8 path on the fake-quantized input."""
    m = tiny_llama()
    q = polyquant.quantize(m, QuantoConfig(bits=8, activations="qint8"), calibration=CAL, show_progress=False)
    assert set(kernel_summary(q)) == {"quanto-int8"}
    lin = next(mod for mod in q.modules() if isinstance(mod, QuantLinear))
    x = torch.randn(3, lin.in_features)
    qx, sx = lin.act_quant.quantize(x)
    assert qx.dtype == torch.int8 and torch.equal(qx.float() * sx, lin.act_quant(x))  # same codes as the rule
    w = (lin.quantized_weight.codes.to(torch.int16) - 128).float()
    acc = qx.double() @ w.double().t()  # exact integer sums
    expect = (acc.float() * (sx * lin.quantized_weight.scale[:, 0])) + (lin.bias if lin.bias is not None else 0)
    with torch.no_grad():
        assert torch.equal(lin(x), expect)
        ref = q(X).logits
        polyquant.set_kernels(q, "reference")
        assert sqnr_db(ref, q(X).logits) > 40
    with pytest.warns(UserWarning, match="calibration"):
        f8 = polyquant.quantize(m, QuantoConfig(bits=8, activations="qfloat8"), show_progress=False)
    with torch.no_grad():
        y = f8(X).logits
        polyquant.set_kernels(f8, "reference")
        assert sqnr_db(f8(X).logits, y) > 30


def test_activation_rule_hand_computed():
    rule = QuantoActivation("qint8", input_scale=torch.tensor(0.01))
    x = torch.tensor([0.5, -0.333, 2.0, 0.004])
    assert torch.allclose(rule(x), torch.tensor([0.5, -0.33, 1.27, 0.0]), atol=1e-7)
    f8 = QuantoActivation("qfloat8", input_scale=torch.tensor(1.0))
    assert f8(torch.tensor([1000.0, 3.3])).tolist() == [448.0, 3.25]


def test_calibration_follows_quantos_momentum_rule():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    rule = QuantoActivation("qint8", momentum=0.9)
    ql = polyquant.quantize(model, QuantoConfig(bits=8, include=["0"]), show_progress=False)
    ql[0].act_quant = rule
    xs = [torch.zeros(1, 64), torch.zeros(1, 64)]
    xs[0][0, 0], xs[1][0, 5] = 1.27, -2.54
    from polyquant.activations.quanto import calibrating as _calibrating
    with torch.no_grad(), _calibrating([(ql[0], rule)]):
        for x in xs:
            ql(x)
    # first batch sets 1.27/127 = 0.01, the second: 0.9 * 0.01 + 0.1 * 0.02
    assert rule.input_scale.item() == pytest.approx(0.011, rel=1e-6)
    assert rule.output_scale is not None and not rule.calibrating


def test_quantize_with_activations_calibrates_every_layer():
    m = tiny_llama()
    q = polyquant.quantize(m, QuantoConfig(bits=8, activations="qint8"), calibration=CAL, show_progress=False)
    rules = [mod.act_quant for mod in q.modules() if isinstance(mod, QuantLinear)]
    assert len(rules) == 14 and all(isinstance(r, QuantoActivation) and r.calibrated for r in rules)
    with torch.no_grad():
        assert sqnr_db(m(X).logits, q(X).logits) > 10
    with pytest.warns(UserWarning, match="calibrat"):
        q2 = polyquant.quantize(m, QuantoConfig(bits=8, activations="qfloat8"), show_progress=False)
    assert not any(mod.act_quant.calibrated for mod in q2.modules() if isinstance(mod, QuantLinear))
    assert calibrate_activations(q2, CAL) == 14
    assert all(mod.act_quant.calibrated for mod in q2.modules() if isinstance(mod, QuantLinear))


# -- against optimum-quanto ---------------------------------------------------------------------
def _quanto():
    return pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (library tests skipped)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 576), (64, 128), (48, 100)])
@pytest.mark.parametrize("weights", ["qint2", "qint4", "qint8", "qfloat8"])
def test_bit_exact_vs_quanto(dtype, shape, weights):
    q = _quanto()
    from polyquant.formats.quanto import pack_weights
    qt = {"qint2": q.qint2, "qint4": q.qint4, "qint8": q.qint8, "qfloat8": q.qfloat8}[weights]
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    if qt.bits == 8:
        scale, shift, g = q.AbsmaxOptimizer()(w, qtype=qt, axis=0), None, None
    else:
        g = quanto_group_size(shape[1])
        scale, shift = q.MaxOptimizer()(w, qtype=qt, axis=0, group_size=g)
    t = q.quantize_weight(w, qtype=qt, axis=0, scale=scale, shift=shift, group_size=g, optimized=False)
    qw = quanto_quantize(w, QuantoConfig(weights=weights))
    if weights == "qint8":
        assert torch.equal((qw.codes.to(torch.int16) - 128).to(torch.int8), t._data)
    elif weights == "qfloat8":
        assert torch.equal(qw.codes.view(torch.uint8), t._data.view(torch.uint8))
    else:
        assert torch.equal(pack_weights(qw.codes.reshape(-1, g or shape[1]), qt.bits), t._data._data)
        assert torch.equal((qw.zero * qw.scale.double()).to(dtype).reshape(-1, 1), t._shift)
    assert torch.equal(qw.scale.reshape(-1, 1), t._scale.reshape(-1, 1))


def test_scales_and_logits_match_quanto_on_the_same_calibration():
    """quanto quantizes every layer's output during the first calibration batch (its streamline trace
    never keeps one, module doc of quanto_act); polyquant does the same, so every input and output
    scale is bit-identical to quanto's and the calibrated models give the same logits."""
    q = _quanto()
    m = tiny_llama(hidden=128)
    ours = polyquant.quantize(m, QuantoConfig(bits=8, activations="qint8"), calibration=CAL, show_progress=False)
    theirs = tiny_llama(hidden=128)
    q.quantize(theirs, weights=q.qint8, activations=q.qint8, exclude="lm_head")
    with torch.no_grad(), q.Calibration(momentum=0.9):
        for c in CAL:
            theirs(c, use_cache=False)
    q.freeze(theirs)
    qmods = {n: mod for n, mod in theirs.named_modules() if isinstance(mod, q.QModuleMixin)}
    assert len(qmods) == 14
    for n, mod in qmods.items():
        rule = ours.get_submodule(n).act_quant
        assert torch.equal(rule.input_scale, mod.input_scale), n
        assert torch.equal(rule.output_scale, mod.output_scale), n
        assert not rule.quantize_outputs
        # quanto removed every output-quantization hook during calibration: none is left
        assert mod._quantize_hooks["output"].id not in mod._forward_hooks, n
    assert set(kernel_summary(ours)) == {"quanto-int8"}
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, mod in qmods.items():  # every layer on the same input: quanto's int8 x int8 product, exactly
            if mod.in_features == 128:
                assert torch.equal(ours.get_submodule(n)(x), mod(x)), n
        a, b = theirs(X).logits, ours(X).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


def test_calibration_quantizes_outputs_until_the_parent_returns():
    """The first batch through a parent sees its children's outputs fake-quantized with the freshly
    set output scale; once the parent has returned, outputs pass through unchanged."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 32, bias=False)

        def forward(self, x):
            return self.a(x)

    model = polyquant.quantize(torch.nn.Sequential(Block()), QuantoConfig(bits=8, activations="qint8",
                                                                          include=["0.a"]), show_progress=False)
    lin = model[0].a
    x1 = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    outs = []
    from polyquant.activations.quanto import calibrating as _calibrating, parents as _parents
    rules = [(lin, lin.act_quant)]
    with torch.no_grad(), _calibrating(rules, _parents(model, rules)):
        assert lin.act_quant.quantize_outputs
        outs.append(model(x1))
        assert not lin.act_quant.quantize_outputs
        outs.append(model(x1))
    s = lin.act_quant.output_scale
    with torch.no_grad():
        plain = model(x1)
    first_scale = plain.abs().amax() / 127  # second batch: scale unchanged (same input) up to momentum
    assert torch.allclose(s, first_scale, rtol=1e-6)
    codes = outs[0] / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)           # first batch: on the int8 grid
    assert torch.equal(outs[1], plain)                                  # later batches: untouched
    assert not torch.allclose(outs[0], plain, atol=1e-6, rtol=0)


def test_qint4_forward_matches_quanto():
    q = _quanto()
    m = tiny_llama(hidden=128)
    ours = polyquant.quantize(m, QuantoConfig(bits=4), show_progress=False)
    polyquant.set_kernels(ours, "reference")
    theirs = tiny_llama(hidden=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize(theirs, weights=q.qint4, exclude="lm_head")
        q.freeze(theirs)
    with torch.no_grad():
        assert torch.allclose(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qint8_and_qfloat8_codes_equal_the_formula(dtype):
    """quanto's AbsmaxOptimizer rule written plainly (|w| max, division and clamp in the weight's dtype)
    against polyquant's faster path (max/min reductions, in-place rounding, sign-bit-flip offset)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 200, generator=g) * 0.05
    w[1] = 0.0
    w[2] = torch.randn(200, generator=g) * 1e-6
    w = w.to(dtype)
    for weights, qmax in (("qint8", 127.0), ("qfloat8", 448.0)):
        scale = w.abs().amax(1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        qw = quanto_quantize(w, QuantoConfig(weights=weights))
        assert torch.equal(qw.scale, scale)
        if weights == "qint8":
            ref = (torch.clamp(torch.round(w / safe), -128, 127).to(torch.int16) + 128).to(torch.uint8)
            assert torch.equal(qw.codes, ref)
        else:
            ref = (w / safe).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(qw.codes.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_non_finite_weights_are_refused(bits):
    w = torch.randn(8, 64)
    w[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quanto_quantize(w, QuantoConfig(bits=bits))
