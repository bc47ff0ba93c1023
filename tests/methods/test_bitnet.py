"""bitnet (absmean PTQ): codes and scales against transformers' WeightQuant (AutoBitLinear online) and the
formula, per-channel / per-group options, config validation, and the layers it builds."""
from __future__ import annotations

import pytest
import torch

import polyquant
from helpers import tiny_llama
from polyquant.activations.bitnet import BitNetActivation
from polyquant.methods.bitnet import BitNetConfig, bitnet_quantize


def test_per_tensor_matches_transformers_weight_quant():
    from transformers.integrations.bitnet import WeightQuant
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.03
    w[0, 0] = 0.5  # an outlier that clips to 1
    qw = bitnet_quantize(w, BitNetConfig())
    assert qw.qtype == "ternary" and qw.block == (24, 40) and qw.scale.shape == (1, 1)
    with torch._dynamo.config.patch(disable=True):
        fq = WeightQuant.forward(None, w)  # (w * s).round().clamp(-1, 1) / s, s = 1 / mean|w|
    m = w.abs().mean()
    assert float(qw.scale) == float(m)
    assert torch.equal(qw.codes.long() - 1, (fq * (1 / m)).round().long())
    torch.testing.assert_close(qw.dequantize(), fq, rtol=1e-6, atol=0)
    assert int(qw.codes[0, 0]) == 2


def test_channel_and_group_scales():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    w[2] *= 10
    ch = bitnet_quantize(w, BitNetConfig(granularity="channel"))
    assert ch.block == (1, 64) and torch.allclose(ch.scale.reshape(-1), w.abs().mean(1))
    gr = bitnet_quantize(w, BitNetConfig(granularity="group", group_size=16))
    assert gr.block == (1, 16) and gr.scale.shape == (6, 4)
    assert torch.allclose(gr.scale, w.view(6, 4, 16).abs().mean(-1))
    want = (w / gr.full_scale()).round().clamp(-1, 1)
    assert torch.equal(gr.codes.float() - 1, want)
    zero = bitnet_quantize(torch.zeros(4, 8), BitNetConfig())
    assert float(zero.scale) == pytest.approx(1e-5) and torch.equal(zero.dequantize(), torch.zeros(4, 8))


@pytest.mark.parametrize("kw,field", [({"granularity": "row"}, "granularity"), ({"group_size": 0}, "group_size"),
                                      ({"linear_class": "BitLinear"}, "linear_class")])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        BitNetConfig(**kw)


def test_quantized_model_layers():
    q = polyquant.quantize(tiny_llama(), BitNetConfig(), show_progress=False)
    lins = [m for m in q.modules() if hasattr(m, "quantized_weight")]
    assert len(lins) == 14 and all(isinstance(m.act_quant, BitNetActivation) for m in lins)
    assert {m.kernel_name for m in lins} == {"cpu-ternary"}
    assert q.lm_head.__class__.__name__ == "Linear"
    assert torch.isfinite(q(torch.randint(0, 256, (1, 8))).logits).all()
