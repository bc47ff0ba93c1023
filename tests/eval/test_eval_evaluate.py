"""``evaluate``: the flat result dict, model description, speed helpers, encoders, threads."""
from __future__ import annotations

import json
import math

import pytest
import torch

import polyquant
from helpers import AUTO_INT4, tiny_bert, tiny_llama, tiny_tokenizer_dir
from polyquant.eval import REQUIRED_KEYS, describe_model, evaluate, greedy_decode


def _stream(n=600):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(3))


def test_result_has_required_keys_and_is_json():
    model = tiny_llama()
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    res = evaluate(q, tokens=_stream(), seqlen=64, reference=model, decode_tokens=4, show_progress=False)
    missing = [k for k in REQUIRED_KEYS if k not in res]
    assert not missing
    json.loads(json.dumps(res))  # plain types only
    assert (res["method"], res["bits"], res["group_size"], res["kernel"]) == ("rtn", 4, 32, AUTO_INT4)
    assert res["kernels"] == {AUTO_INT4: 14}
    assert res["windows"] == 9 and res["tokens"] == 576 and res["text_tokens"] == 600
    assert res["prefill_tok_s"] > 0 and res["prefill_tokens"] == 64
    assert res["decode_tok_s"] > 0 and res["decode_tokens"] == 4
    assert 0 < res["kl"] and 0 < res["top1"] <= 1 and math.isfinite(res["ppl"])
    assert res["peak_rss_bytes"] > 0 and res["weight_bytes"] > 0 and res["threads"] >= 1


def test_describe_fp32_and_mixed_kernels():
    model = tiny_llama()
    d = describe_model(model)
    assert (d["method"], d["bits"], d["group_size"], d["format"], d["kernel"]) == ("fp32", 32, None, None, "fp32")
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        q.get_submodule(name).set_kernel("reference")
    assert describe_model(q)["kernel"] == f"{AUTO_INT4}:12,reference:2"


def test_greedy_decode_matches_generate():
    model = tiny_llama()
    prompt = _stream(12)
    new, seconds = greedy_decode(model, prompt, 10)
    ref = model.generate(prompt.unsqueeze(0), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                         attention_mask=torch.ones(1, 12, dtype=torch.long))
    assert torch.equal(new, ref[0, 12:]) and seconds > 0


def test_threads_set_and_restored():
    before = torch.get_num_threads()
    res = evaluate(tiny_llama(), tokens=_stream(), seqlen=64, max_windows=1, threads=before + 1,
                   decode_tokens=2, show_progress=False)
    assert res["threads"] == before + 1 and torch.get_num_threads() == before


def test_encoder_does_not_crash():
    res = evaluate(tiny_bert(), tokens=_stream(), seqlen=512, decode_tokens=2, show_progress=False)
    assert res["ppl"] is None and res["kl"] is None and res["top1"] is None and res["decode_tok_s"] is None
    assert res["prefill_tok_s"] > 0 and res["prefill_tokens"] == 128  # capped at max_position_embeddings
    json.dumps(res)


def test_text_and_tokenizer_path(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path / "tok"))
    text = " ".join(f"w{i % 250}" for i in _stream(300).tolist())
    f = tmp_path / "eval.txt"
    f.write_text(text, encoding="utf-8")
    model = tiny_llama()
    a = evaluate(model, tok, text=text, seqlen=64, measure_speed=False, show_progress=False)
    b = evaluate(model, tok, text=f, seqlen=64, measure_speed=False, show_progress=False)
    assert a["text_tokens"] == 300 and a["windows"] == 4   # a user text is used whole
    assert a["ppl"] == b["ppl"]
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, None, seqlen=64, measure_speed=False)
