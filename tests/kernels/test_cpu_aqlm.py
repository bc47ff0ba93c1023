"""cpu-aqlm against the reference kernel: table look-ups (<= 256-entry code books) and the code-word
gather (1x16), every SIMD path this CPU has, odd shapes, decode and prefill row counts."""
from __future__ import annotations

import pytest
import torch

from polyquant.kernels import select_kernel
from polyquant.kernels.cpu_aqlm import aqlm_gather_mm, aqlm_lut_mm, simd_levels, sweep_available
from polyquant.nn.quant_linear import QuantLinear
from polyquant.tensor.quantized_weight import QuantizedWeight

pytestmark = pytest.mark.skipif(not sweep_available(), reason="compiled kernels unavailable")


def _qw(out, inp, m, b, ig=8, og=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << b, (out // og, inp // ig, m), generator=g)
    cb = (torch.randn(m, 1 << b, og, ig, generator=g) * 0.1).half()
    s = (torch.rand(out // og, generator=g) + 0.5).half()
    return QuantizedWeight.from_vector_codes(codes, cb, s)


@pytest.mark.parametrize("out, inp, m, b, ig", [(37, 24, 2, 8, 8), (5, 40, 1, 8, 8), (19, 48, 4, 8, 8),
                                                (33, 36, 3, 6, 4), (17, 64, 8, 8, 8), (11, 48, 1, 4, 16)])
@pytest.mark.parametrize("rows", [1, 3])
def test_lut_matches_reference(out, inp, m, b, ig, rows):
    qw = _qw(out, inp, m, b, ig)
    x = torch.randn(rows, inp)
    ref = x @ qw.dequantize().t()
    cb = qw.codebooks.float().reshape(m, 1 << b, ig)
    for simd in simd_levels():
        y = aqlm_lut_mm(x, qw.data, cb.permute(0, 2, 1).contiguous(), qw.scale.float().reshape(-1), simd=simd)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), simd


@pytest.mark.parametrize("out, inp, m, b, ig", [(300, 1032, 2, 8, 8), (260, 520, 1, 2, 8), (9, 4104, 1, 8, 8)])
def test_lut_tiles_match_reference(out, inp, m, b, ig):
    """Shapes past the kernel's tiling: more rows than a row block (256), more tables than fit one L1
    slice (32 KiB: 32 of 256 entries), a table count that is not a multiple of the gather width (8),
    code books of fewer than 8 entries (the register-blocked table build's fallback)."""
    qw = _qw(out, inp, m, b, ig)
    x = torch.randn(2, inp)
    ref = x.double() @ qw.dequantize().double().t()
    cb = qw.codebooks.float().reshape(m, 1 << b, ig)
    for simd in simd_levels():
        y = aqlm_lut_mm(x, qw.data, cb.permute(0, 2, 1).contiguous(), qw.scale.float().reshape(-1), simd=simd)
        assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4), simd


@pytest.mark.parametrize("out, inp, m, b", [(13, 24, 1, 16), (7, 40, 2, 12), (9, 16, 2, 8)])
def test_gather_matches_reference(out, inp, m, b):
    qw = _qw(out, inp, m, b)
    x = torch.randn(2, inp)
    ref = x @ qw.dequantize().t()
    cb = qw.codebooks.float().reshape(m, 1 << b, 8).contiguous()
    codes = qw.data if b > 8 else qw.data.to(torch.int16)
    for simd in simd_levels():
        y = aqlm_gather_mm(x, codes.contiguous(), cb, qw.scale.float().reshape(-1), simd=simd)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), simd


@pytest.mark.parametrize("m, b", [(2, 8), (1, 16)])
def test_layer_decode_and_prefill(m, b):
    qw = _qw(40, 32, m, b)
    bias = torch.randn(40)
    lin = QuantLinear(qw, bias)
    assert lin.kernel_name == "cpu-aqlm"
    ref = QuantLinear(qw, bias, kernel="reference")
    for shape in [(1, 1, 32), (2, 3, 32), (1, 20, 32)]:
        x = torch.randn(*shape)
        assert torch.allclose(lin(x), ref(x), rtol=1e-4, atol=1e-5), shape


def test_out_groups_take_the_reference():
    qw = _qw(16, 32, 2, 8, og=2)
    k, skipped = select_kernel(qw, "cpu")
    assert k.name == "reference" and "out_group_size" in skipped["cpu-aqlm"]


def test_decode_fast_path_every_input_form():
    """The packed decode call (float32, no bias, contiguous, a few rows) and the general path give the
    reference's output for every input form; the packed call follows buffers that move (share_memory_)."""
    qw = _qw(24, 48, 2, 8)
    lin, ref = QuantLinear(qw, None), QuantLinear(qw, None, kernel="reference")
    xs = [torch.randn(48), torch.randn(1, 1, 48), torch.randn(2, 3, 48), torch.randn(48, 4).t(),  # non-contiguous
          torch.randn(1, 2, 48).bfloat16(), torch.randn(1, 48, requires_grad=True)]
    for x in xs:
        y, r = lin(x), ref(x)
        assert y.shape == r.shape and y.dtype == r.dtype
        if x.dtype == torch.bfloat16:  # both round to bf16 at the end: within one bf16 step of the float32 result
            r = ref(x.float())
            assert torch.allclose(y.float(), r, rtol=2 ** -7, atol=1e-3)
        else:
            assert torch.allclose(y, r, rtol=1e-4, atol=1e-5)
    before = lin._buffers["k_codes"].data_ptr()
    lin.share_memory()
    assert lin._buffers["k_codes"].data_ptr() != before
    x = torch.randn(1, 1, 48)
    assert torch.allclose(lin(x), ref(x), rtol=1e-4, atol=1e-5)
