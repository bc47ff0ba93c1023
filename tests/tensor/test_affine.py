"""Affine primitives: block views, scale/zero choice (GPTQ / compressed-tensors conventions), rounding."""
import pytest
import torch

from polyquant.qtypes import int_qtype
from polyquant.tensor.affine import block_reduce, block_view, choose_qparams, quantize_codes


def test_block_view_shape_and_padding_keeps_extremes():
    w = torch.arange(30, dtype=torch.float32).reshape(3, 10)
    v = block_view(w, (2, 4))  # grid [2, 3], 8 elements per block
    assert v.shape == (2, 3, 8)
    assert v[0, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    # short edge blocks repeat their own last row/column: min/max unchanged
    assert v[0, 2].amin() == 8 and v[0, 2].amax() == 19
    assert v[1, 2].amin() == 28 and v[1, 2].amax() == 29
    assert block_reduce(w, (1, 4), "max")[:, -1].tolist() == [9, 19, 29]


def test_sym_scale_convention():
    w = torch.tensor([[-3.0, 1.0, 7.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s, z = choose_qparams(w, int_qtype(4, True), (1, 4))
    assert z is None
    assert s[0, 0].item() == 1.0  # absmax / 7.5
    assert s[1, 0].item() == torch.finfo(torch.float32).eps  # all-zero group
    s8, _ = choose_qparams(w, int_qtype(8, True), (1, 4))
    assert s8[0, 0].item() == pytest.approx(7.5 / 127.5)
    codes = quantize_codes(w, int_qtype(4, True), (1, 4), s, None)
    # round(w/s) clamped to [-8, 7], +8; 7.5 -> round half to even 8 -> clamped 7 -> code 15
    assert codes[0].tolist() == [5, 9, 15, 8] and codes[1].tolist() == [8] * 4


def test_sym_matches_gptq_quantizer():
    # GPTQ quant.py, sym: xmax = max|w|, scale = 2*xmax/maxq, zero = (maxq+1)/2, q = clamp(round(w/s)+zero, 0, maxq)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    qt = int_qtype(4, True)
    s, _ = choose_qparams(w, qt, (1, 64))
    xmax = w.abs().amax(1, keepdim=True)
    s_ref = 2 * xmax / 15
    q_ref = torch.clamp(torch.round(w / s_ref) + 8, 0, 15)
    assert torch.allclose(s, s_ref, rtol=1e-6)
    assert torch.equal(quantize_codes(w, qt, (1, 64), s, None).float(), q_ref)


def test_asym_scale_zero_convention():
    qt = int_qtype(4, False)
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0],   # min -1, max 2 -> scale 0.2, zero round(5) = 5
                      [1.0, 2.0, 3.0, 1.5],    # range forced to contain 0: [0, 3] -> zero 0
                      [-3.0, -1.0, -2.0, -1.5]])  # [-3, 0] -> zero 15
    s, z = choose_qparams(w, qt, (1, 4))
    assert s[:, 0].tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert z[:, 0].tolist() == [5.0, 0.0, 15.0]
    codes = quantize_codes(w, qt, (1, 4), s, z)
    assert codes[0].tolist() == [0, 8, 15, 5]
    assert codes[1].tolist() == [5, 10, 15, 8]
    assert codes[2].tolist() == [0, 10, 5, 8]


def test_shrink_scales_the_range():
    qt = int_qtype(4, False)
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    s, z = choose_qparams(w, qt, (1, 4), shrink=0.5)
    assert s.item() == pytest.approx(0.1) and z.item() == 5.0
    codes = quantize_codes(w, qt, (1, 4), s, z)
    assert codes.tolist() == [[0, 10, 15, 5]]  # 2.0/0.1 + 5 = 25 clamps to 15


def test_quantize_codes_with_g_idx():
    qt = int_qtype(4, True)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scale = torch.tensor([[1.0, 0.5]])
    g_idx = torch.tensor([1, 0, 0, 1])
    codes = quantize_codes(w, qt, (1, 2), scale, None, g_idx)
    assert codes.tolist() == [[10, 10, 11, 15]]  # 1/0.5=2, 2/1=2, 3/1=3, 4/0.5=8 -> 7
