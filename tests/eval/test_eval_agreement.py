"""KL divergence to a reference and top-1 agreement."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import polyquant
from helpers import tiny_llama
from polyquant.eval import evaluate, kl_top1


def test_kl_top1_on_hand_checked_logits():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.5, 0.3]], dtype=torch.float64)
    expected = float((p * (p / q).log()).sum())  # sum over positions of KL(p || q)
    kl_sum, agree, n = kl_top1(p.log().float(), q.log().float())
    assert abs(kl_sum - expected) < 1e-6 and n == 2
    assert agree == 1  # row 0: both argmax 0; row 1: 2 vs 1
    # logits are shift-invariant: only log-softmax matters
    assert abs(kl_top1(p.log().float() + 3.0, q.log().float() - 1.0)[0] - expected) < 1e-5


def test_kl_matches_torch_kl_div_over_many_positions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 300, 50, generator=g), torch.randn(3, 300, 50, generator=g)  # > one chunk
    ref = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum")
    kl_sum, agree, n = kl_top1(a, b)
    assert n == 900 and abs(kl_sum - float(ref)) < 1e-3 * float(ref)
    assert agree == int((a.argmax(-1) == b.argmax(-1)).sum())


def _stream():
    return torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(2))


def test_model_against_itself_is_zero_kl_full_agreement():
    model = tiny_llama()
    res = evaluate(model, tokens=_stream(), seqlen=64, reference=copy.deepcopy(model), measure_speed=False,
                   show_progress=False)
    assert abs(res["kl"]) < 1e-7 and res["top1"] == 1.0


def test_rtn_2bit_diverges_from_reference():
    model = tiny_llama(hidden=128)
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=2, group_size=32), show_progress=False)
    res = evaluate(q, tokens=_stream(), seqlen=64, reference=model, measure_speed=False, show_progress=False)
    assert res["kl"] > 1e-4 and res["top1"] < 0.99
    # and it equals the mean KL computed by hand over the same windows
    w = _stream()[:9 * 64].reshape(9, 64)
    with torch.no_grad():
        lr = F.log_softmax(model(input_ids=w).logits.float(), -1)
        lq = F.log_softmax(q(input_ids=w).logits.float(), -1)
    kl = float((lr.exp() * (lr - lq)).sum(-1).mean())
    top1 = int((lr.argmax(-1) == lq.argmax(-1)).sum()) / (9 * 64)
    assert abs(res["kl"] - kl) < 1e-6 * max(1.0, kl) + 1e-7 and abs(res["top1"] - top1) < 1e-9
