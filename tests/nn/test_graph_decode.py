"""The graph decode runtime (``nn/graph_decode.py``). On a CPU its static step (position and token
as tensors, attention over the whole cache under a mask) runs eagerly: the same tokens as the
model's own forward for 64 greedy steps, every step's logits within float32 rounding, nothing that
grows per token, and the reasons it would not capture. On CUDA (skipped elsewhere; run by
``benchmarks/gpu_check_decode.sh``): the captured graph gives the same tokens as the eager step for
every GPU kernel family, and a layer that cannot be captured runs eagerly, recorded."""
import pytest
import torch

import polyquant
from polyquant.eval.speed import greedy_decode
from polyquant.nn.graph_decode import GraphDecoder, capture_reason, graph_greedy_decode
from polyquant.nn.quantize import set_kernels
from tests.helpers import tiny_llama, tiny_qwen2, worst_step_error


def _prompt(n=12, vocab=256, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("quant", [None, dict(bits=4, group_size=32), dict(bits=8, group_size=-1)])
def test_static_step_matches_the_model(make, quant):
    model = make(layers=2)
    if quant is not None:
        model = polyquant.quantize(model, polyquant.RTNConfig(**quant), show_progress=False)
        set_kernels(model, "reference")
    p = _prompt()
    dec = GraphDecoder(model, max_len=96)
    assert dec.graph_reason is not None and not dec.captured  # CPU: eager static step
    fast, _ = graph_greedy_decode(dec, p, 64)
    plain, _ = greedy_decode(model, p, 64)
    assert torch.equal(fast, plain)
    worst = worst_step_error(dec, model, p, plain)
    assert worst < 1e-5, worst
    assert dec.pos == len(p) + len(plain) - 1 and int(dec._pos) == dec.pos
    assert dec.info["runtime"] == "graph" and dec.info["graph"] is False


def test_generate_writes_the_predictions_and_advances_on_the_device():
    model = tiny_llama(layers=2)
    p = _prompt()
    dec = GraphDecoder(model, max_len=64)
    logits = dec(p)
    first = logits.argmax(-1, keepdim=True)
    toks = dec.generate(first, 20)
    assert toks.shape == (20,) and dec.pos == len(p) + 20 and int(dec._pos) == dec.pos
    plain, _ = greedy_decode(model, p, 21)
    assert torch.equal(torch.cat([first, toks[:-1]]), plain[:20])
    with pytest.raises(ValueError, match="KV cache full"):
        dec.generate(toks[-1:], 64)


def test_static_step_allocates_nothing_that_grows():
    model = tiny_llama(layers=2)
    dec = GraphDecoder(model, max_len=80)
    ptrs = (dec.k_cache.data_ptr(), dec.v_cache.data_ptr(), dec._hist.data_ptr())
    tok = dec(_prompt()).argmax(-1, keepdim=True)
    dec.generate(tok, 60)
    assert (dec.k_cache.data_ptr(), dec.v_cache.data_ptr(), dec._hist.data_ptr()) == ptrs
    assert dec.k_cache.shape[2] == 80


def test_capture_reasons(monkeypatch):
    model = tiny_llama(layers=1)
    dec = GraphDecoder(model, max_len=32, graph=False)
    assert dec.graph_reason == "graph=False" and dec.fallbacks == []
    assert "CUDA device" in capture_reason(dec)
    q = polyquant.quantize(tiny_llama(layers=1), polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    set_kernels(q, "reference")
    from polyquant.kernels.reference import ReferenceKernel
    monkeypatch.setattr(ReferenceKernel, "graph_safe", False)
    monkeypatch.setattr(ReferenceKernel, "graph_unsafe_reason", "a test says so")
    why = capture_reason(GraphDecoder(q, max_len=32, graph=False))
    assert "layer 0 qkv" in why and "a test says so" in why
    from polyquant.activations.llm_int8 import LLMInt8Activation
    from polyquant.kernels.bnb_int8 import LLMInt8Kernel
    assert not LLMInt8Kernel.graph_safe and not LLMInt8Activation.graph_safe


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_rows():
    from polyquant.methods import RTNConfig
    from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig
    return [("rtn-w4-sym", RTNConfig(bits=4, group_size=64, sym=True)),
            ("rtn-w4-asym", RTNConfig(bits=4, group_size=64, sym=False)),
            ("rtn-w8-pc", RTNConfig(bits=8, group_size=-1, sym=True)),
            ("fp8-block", Fp8BlockConfig()), ("fbgemm-fp8", FbgemmFp8Config())]


@cuda
@pytest.mark.parametrize("row", range(6))
def test_captured_graph_gives_the_eager_tokens_on_cuda(row):
    model = tiny_llama(hidden=256, layers=2, vocab=512).to(torch.bfloat16)  # before quantizing: a dtype
    if row < 5:  # cast afterwards would turn float8 weights into bf16 ones
        label, cfg = _cuda_rows()[row]
        model = polyquant.quantize(model, cfg, show_progress=False)
    model = model.to("cuda")
    set_kernels(model)
    p = _prompt(vocab=512)
    eager = GraphDecoder(model, max_len=96, graph=False)
    want, _ = graph_greedy_decode(eager, p, 64)
    dec = GraphDecoder(model, max_len=96)
    got, _ = graph_greedy_decode(dec, p, 64)
    assert dec.captured, dec.fallbacks
    assert torch.equal(got, want)
    again, _ = graph_greedy_decode(dec, p, 64)  # replays the same graph from a reset
    assert torch.equal(again, want)


@pytest.mark.parametrize("quant", [None, dict(bits=4, group_size=32)])
def test_fused_ops_step_matches_the_model(monkeypatch, quant):
    """The fused small ops (Triton's interpreter on a CPU) inside the static step: the same greedy
    tokens as the model's own forward and each step's logits within float32 rounding."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_llama(layers=2)
    if quant is not None:
        model = polyquant.quantize(model, polyquant.RTNConfig(**quant), show_progress=False)
        set_kernels(model, "reference")
    p = _prompt()
    dec = GraphDecoder(model, max_len=64, fused_ops=True)
    assert dec.fused_ops_reason is None and dec.info["fused_ops"]
    fast, _ = graph_greedy_decode(dec, p, 24)
    plain, _ = greedy_decode(model, p, 24)
    assert torch.equal(fast, plain)
    assert worst_step_error(dec, model, p, plain[:9]) < 1e-5  # the first 8 one-token steps


def test_fused_ops_refusals(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dec = GraphDecoder(tiny_llama(layers=1), max_len=32)
    assert "off by default" in dec.fused_ops_reason
    with pytest.raises(ValueError, match="fused_ops=True"):
        GraphDecoder(tiny_llama(layers=1), max_len=32, fused_ops=True)


@cuda
def test_fused_ops_on_cuda_match_the_model_in_float32():
    model = tiny_llama(hidden=256, layers=2, vocab=512).to("cuda")
    p = _prompt(vocab=512)
    dec = GraphDecoder(model, max_len=96, fused_ops=True)
    assert dec.fused_ops_reason is None
    got, _ = graph_greedy_decode(dec, p, 64)
    plain, _ = greedy_decode(model, p.to("cuda"), 64)
    assert dec.captured and torch.equal(got, plain.cpu())
