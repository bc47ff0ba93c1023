"""EETQ quantizer: FasterTransformer's symmetric_quantize (absmax/128, C rounding, float32 scale for
the codes, fp16 scale stored), checked on hand-computed values (EETQ itself needs CUDA)."""
from __future__ import annotations

import pytest
import torch

import polyquant
from helpers import sqnr_db, tiny_llama
from polyquant.methods.eetq import EETQConfig, eetq_quantize, round_half_away
from polyquant.nn.quantize import kernel_summary


def test_round_half_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -1.2, 3.0])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, -1.0, 3.0]
    assert torch.round(x).tolist() != round_half_away(x).tolist()  # torch rounds ties to even


def test_hand_computed_codes_and_scale():
    # absmax 2 -> scale 2/128 = 0.015625 (exact); 2 -> 128 -> clipped 127; -1 -> -64;
    # 0.0078125 = 0.5 * scale -> 1 (half away; torch.round would give 0); -2.5 * scale -> -3 (not -2)
    w = torch.tensor([[2.0, -1.0, 0.0078125, -0.0390625]])
    qw = eetq_quantize(w, EETQConfig())
    assert qw.qtype == "int8" and qw.block == (1, 4)
    assert qw.scale.dtype == torch.float16 and qw.scale.item() == 0.015625
    assert (qw.codes.to(torch.int16) - 128).tolist() == [[127, -64, 1, -3]]


def test_codes_use_the_float32_scale_and_dequantize_with_the_stored_one():
    amax = 1.0001
    s32 = torch.tensor(amax) / 128
    s16 = s32.to(torch.float16).float()
    grid = torch.linspace(0.01, 0.99, 2000)
    # values whose code differs depending on which scale divides them
    v = grid[round_half_away(grid / s32) != round_half_away(grid / s16)][:4]
    assert v.numel() == 4
    w = torch.cat([torch.tensor([amax]), v]).reshape(1, -1)
    qw = eetq_quantize(w, EETQConfig())
    codes = (qw.codes.to(torch.int16) - 128)[0, 1:]
    assert torch.equal(codes.float(), round_half_away(v / s32))
    assert torch.equal(qw.dequantize(), (qw.codes.float() - 128) * s16)
    assert eetq_quantize(w, EETQConfig(scale_dtype="float32")).scale.dtype == torch.float32


def test_zero_channel_reproduces_eetqs_nan_clamp():
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 1, 8)
    qw = eetq_quantize(w, EETQConfig())
    assert (qw.codes[0].to(torch.int16) - 128).tolist() == [127] * 8  # min(127, NaN) in C -> 127
    assert torch.equal(qw.dequantize()[0], torch.zeros(8))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="scale_dtype"):
        EETQConfig(scale_dtype="bfloat16")


def test_tiny_llama():
    m = tiny_llama(hidden=128)
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    q = polyquant.quantize(m, EETQConfig(), show_progress=False)
    assert kernel_summary(q) == {"cpu-int8": 14}
    with torch.no_grad():
        assert sqnr_db(m(x).logits, q(x).logits) > 25


def test_non_finite_weights_are_refused():
    w = torch.randn(8, 64)
    w[1, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        eetq_quantize(w, EETQConfig())
