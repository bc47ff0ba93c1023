"""Perplexity (GPTQ protocol): windows and the NLL against an independent hand computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from polyquant.eval import evaluate, make_windows


def _stream(n: int, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_windows_non_overlapping_and_counted():
    t = torch.arange(1000)
    w = make_windows(t, 64)
    assert w.shape == (1000 // 64, 64)                       # n = tokens // seqlen, remainder dropped
    assert torch.equal(w.reshape(-1), t[:15 * 64])           # consecutive, non-overlapping, from the start
    assert make_windows(t, 64, max_windows=4).shape == (4, 64)
    assert make_windows(t, 64, max_windows=100).shape == (15, 64)
    with pytest.raises(ValueError, match="seqlen"):
        make_windows(t, 1)
    with pytest.raises(ValueError, match="max_windows"):
        make_windows(t, 64, max_windows=0)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        make_windows(t[:10], 64)


def _hand_ppl(model, stream, seqlen, n):
    nlls = []
    with torch.no_grad():
        for i in range(n):
            w = stream[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=w).logits[0].float()
            nlls.append(float(F.cross_entropy(logits[:-1], w[0, 1:])))
    return math.exp(sum(nlls) / n), sum(nlls) / n


def test_ppl_matches_hand_computation():
    model = tiny_llama()
    stream = _stream(1000)
    res = evaluate(model, tokens=stream, seqlen=64, measure_speed=False, show_progress=False)
    ppl, nll = _hand_ppl(model, stream, 64, 15)
    assert res["windows"] == 15 and res["tokens"] == 15 * 64 and res["seqlen"] == 64
    assert abs(res["ppl"] - ppl) < 1e-5 and abs(res["nll"] - nll) < 1e-6
    assert 150 < res["ppl"] < 400  # a random model over 256 tokens is near uniform


def test_max_windows_scores_only_the_first_windows():
    model = tiny_llama()
    stream = _stream(1000)
    res = evaluate(model, tokens=stream, seqlen=64, max_windows=3, measure_speed=False, show_progress=False)
    ppl, _ = _hand_ppl(model, stream, 64, 3)
    assert res["windows"] == 3 and res["tokens"] == 192
    assert abs(res["ppl"] - ppl) < 1e-5
    # a different window set gives a different number (the check above is not vacuous)
    assert abs(_hand_ppl(model, stream[64:], 64, 3)[0] - ppl) > 1e-3


@pytest.mark.slow
def test_default_model_fp32_ppl_40_windows():
    import polyquant
    model, tok = polyquant.load_model("default")
    res = evaluate(model, tok, seqlen=512, max_windows=40, measure_speed=False, show_progress=False)
    assert res["windows"] == 40 and res["tokens"] == 40 * 512
    assert res["ppl"] == pytest.approx(14.01, rel=0.005)  # peers.md: 40 windows of 512, pydoc, no specials
