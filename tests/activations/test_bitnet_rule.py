"""BitNet's activation rule on hand-made tensors: ties (round half to even), zeros and the 1e-5 floor,
clamp bounds, the optional input RMSNorm against LlamaRMSNorm, and its description round trip."""
from __future__ import annotations

import torch

from polyquant.activations import ACT_RULES, act_from_dict, rule_of
from polyquant.activations.bitnet import BitNetActivation


def test_hand_made_rows():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 0.0],   # absmax 127: xs = 1, ties to even
                      [0.0] * 8,                                            # zeros: floor 1e-5, codes 0
                      [1e-6, -2e-6, 3e-6, 0, 0, 0, 0, 0],                   # below the floor: 127 / 1e-5
                      [2.0, -1.0, 1.0, 0.5, 0.25, -2.0, 1e-3, 0.0]])
    q, xs = BitNetActivation.quantize(x)
    assert q.dtype == torch.int8 and xs.shape == (4, 1)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -127, 0]
    assert q[1].tolist() == [0] * 8 and float(xs[1]) == float(torch.tensor(1.0) / torch.tensor(1e-5) * 127)
    want = [round(v * float(xs[2])) for v in (1e-6, -2e-6, 3e-6)]
    assert q[2, :3].tolist() == want == [13, -25, 38]
    # absmax 2 -> xs = 63.5: 1 -> 63.5 -> 64 (even), 0.5 -> 31.75 -> 32, 0.25 -> 15.875 -> 16
    assert q[3].tolist() == [127, -64, 64, 32, 16, -127, 0, 0]
    fake = BitNetActivation()(x)
    torch.testing.assert_close(fake, q.float() / xs)


def test_rmsnorm_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    w = torch.rand(16) + 0.5
    ref = LlamaRMSNorm(16, eps=1e-6)
    ref.weight.data = w.clone()
    x = torch.randn(3, 5, 16)
    rule = BitNetActivation(w, 1e-6)
    assert torch.equal(rule.norm(x), ref(x))
    q, xs = BitNetActivation.quantize(ref(x))
    assert torch.equal(rule(x), q.float() / xs)


def test_description_round_trip():
    assert ACT_RULES["bitnet"] is BitNetActivation
    r = rule_of(BitNetActivation())
    assert r.kind == "bitnet" and r.dtype == "int8" and r.granularity == "token" and r.clamp == (1e-5, None)
    back = act_from_dict(BitNetActivation().to_dict())
    assert isinstance(back, BitNetActivation) and back.norm_weight is None
    w = torch.rand(8)
    back = act_from_dict(BitNetActivation(w, 1e-5).to_dict(), norm_weight=w)
    assert torch.equal(back.norm_weight, w) and back.eps == 1e-5
