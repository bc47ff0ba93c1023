"""CPU fast kernels (cpu-int4, cpu-int8) against the reference kernel, and the dispatch table.

Both kernels run bf16 activations (and bf16 scales), so they agree with the fp32 reference
(dequantize + matmul) only to bf16 precision. Measured on torch 2.13 CPU, weights ~N(0, 0.05),
x ~N(0, 1): max |y - y_ref| / max |y_ref| between 1.4e-3 and 4.1e-3 over every layout and batch
shape below. Asserted tolerance: 1e-2.
"""
import pytest
import torch

from helpers import AUTO_INT4, HAVE_LUT4

from polyquant.methods import RTNConfig
from polyquant.methods.rtn import rtn_quantize
from polyquant.nn import QuantLinear

TOL = 1e-2


def _rel_err(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def _layer(out, inp, bits, group, sym, kernel="auto", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    qw = rtn_quantize(w, RTNConfig(bits=bits, group_size=group, sym=sym))
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear(qw, b, kernel=kernel), QuantLinear(qw, b, kernel="reference")


@pytest.mark.parametrize("bits,group,kernel", [(4, -1, "cpu-int4"), (4, 32, "cpu-int4"), (4, 64, "cpu-int4"),
                                               (3, 64, "cpu-int4"), (2, 128, "cpu-int4"), (8, -1, "cpu-int8")])
@pytest.mark.parametrize("sym", [True, False])
def test_fast_kernel_matches_reference(bits, group, kernel, sym):
    fast, ref = _layer(64, 256, bits, group, sym, kernel=kernel)
    assert fast.kernel_name == kernel
    for shape in ((1, 256), (3, 5, 256), (2, 40, 256)):  # the last one takes cpu-int8's many-rows path
        x = torch.randn(*shape)
        y, y_ref = fast(x), ref(x)
        assert y.shape == y_ref.shape == (*shape[:-1], 64) and y.dtype == torch.float32
        assert _rel_err(y, y_ref) < TOL, (shape, _rel_err(y, y_ref))


def test_int4_short_last_group_rides_on_group_64():
    """in=576, g128: 4 groups of 128 + one of 64. cpu-int4 runs it with op group 64 and each
    group's scale repeated; the layer's groups get very different magnitudes so that a scale
    taken from the wrong group would show up."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 576, generator=g) * 0.05
    w = w * torch.tensor([1.0, 4.0, 0.25, 2.0, 16.0]).repeat_interleave(128)[:576]
    for sym in (True, False):
        qw = rtn_quantize(w, RTNConfig(bits=4, group_size=128, sym=sym))
        assert qw.scale.shape == (32, 5)
        fast, ref = QuantLinear(qw, None), QuantLinear(qw, None, kernel="reference")
        assert fast.kernel_name == "cpu-int4"
        assert int(fast.kbuf("g")) == 64 and fast.kbuf("sz").shape == (9, 32, 2)
        x = torch.randn(3, 576)
        assert _rel_err(fast(x), ref(x)) < TOL


def test_bf16_and_fp16_activations_keep_their_dtype():
    fast, ref = _layer(32, 128, 4, 32, True)
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 128).to(dt)
        y = fast(x)
        assert y.dtype == dt
        assert _rel_err(y, ref(x.float())) < TOL


def test_act_quant_is_applied_by_fast_kernels():
    # cpu-lut4 takes integer codes where it is auto's choice for them (AVX-512); elsewhere it declines them
    lut4 = ((4, "cpu-lut4"),) if HAVE_LUT4 and AUTO_INT4 == "cpu-lut4" else ()
    for bits, name in ((4, "cpu-int4"), (8, "cpu-int8")) + lut4:
        qw = rtn_quantize(torch.randn(32, 128) * 0.05, RTNConfig(bits=bits, group_size=-1))
        fast = QuantLinear(qw, None, act_quant=torch.round, kernel=name)
        ref = QuantLinear(qw, None, kernel="reference", act_quant=torch.round)
        assert fast.kernel_name == name
        x = torch.randn(4, 128) * 3
        assert _rel_err(fast(x), ref(x)) < TOL
        assert _rel_err(fast(x), QuantLinear(qw, None, kernel="reference")(x)) > 0.05


@pytest.mark.parametrize("out,inp,bits,group,reason,fallback", [
    (64, 256, 5, 64, "4-bit", "reference"),           # 5-bit: no fast CPU kernel (1- to 4-bit codes ride on int4)
    (40, 256, 4, 64, "multiple of 16", "cpu-lut4" if HAVE_LUT4 else "reference"),  # out 40: the compiled kernel
    (64, 80, 4, -1, "do not fit", "reference"),       # in_features 80 is not a multiple of 32
    (64, 256, 4, 48, "do not fit", "reference"),      # group 48
])
def test_auto_falls_back_to_reference_with_reason(out, inp, bits, group, reason, fallback):
    fast, _ = _layer(out, inp, bits, group, True)
    assert fast.kernel_name == fallback
    if fallback == "reference":
        assert reason in fast.kernel_skipped["cpu-int4"]
    assert f"kernel={fallback}" in repr(fast)
    with pytest.raises(ValueError, match=f"cpu-int4.*{reason}"):
        _layer(out, inp, bits, group, True, kernel="cpu-int4")


def test_int8_dispatch():
    fast, _ = _layer(32, 128, 8, 64, True)  # grouped 8-bit: not per-channel
    assert fast.kernel_name == "reference" and "per-channel" in fast.kernel_skipped["cpu-int8"]
    with pytest.raises(ValueError, match="cpu-int8.*per-channel"):
        _layer(32, 128, 8, 64, True, kernel="cpu-int8")
    with pytest.raises(ValueError, match="cpu-int8.*8-bit"):
        _layer(32, 128, 4, 64, True, kernel="cpu-int8")


def test_auto_choice_shows_in_repr_and_can_be_switched():
    fast, ref = _layer(64, 256, 4, 64, False, kernel="cpu-int4")
    assert fast.kernel_name == "cpu-int4" and "kernel=cpu-int4" in repr(fast)
    assert {"k_w", "k_sz"} <= {n for n, _ in fast.named_buffers()}
    x = torch.randn(2, 256)
    assert fast.set_kernel("reference") == "reference"
    assert not any(n.startswith("k_") for n, _ in fast.named_buffers())
    assert torch.equal(fast(x), ref(x)) and "kernel=reference" in repr(fast)
    assert fast.set_kernel("auto") == AUTO_INT4
    assert _rel_err(fast(x), ref(x)) < TOL
