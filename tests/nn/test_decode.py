"""The fast decode runtime: same tokens as the model's own forward for 64 greedy steps, logits within
float32 rounding, every quantized layout (fallbacks recorded), refusals with reasons, and no
allocation growth per token in the KV cache."""
import pytest
import torch

import polyquant
from polyquant.eval.speed import greedy_decode
from polyquant.nn.decode import FastDecoder, fast_decode_reason, fast_greedy_decode
from polyquant.methods.rtn import rtn_quantize
from polyquant.nn.quantize import set_kernels
from polyquant.tensor.quantized_weight import QuantizedWeight
from polyquant.tensor.sparse import SparseOutliers
from tests.helpers import tiny_llama, tiny_qwen2, worst_step_error


def _prompt(n=12, vocab=256, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("quant", [None, dict(bits=4, group_size=32), dict(bits=8, group_size=-1)])
def test_fast_decode_matches_the_model(make, quant, native):
    model = make(layers=2)
    if quant is not None:
        model = polyquant.quantize(model, polyquant.RTNConfig(**quant), show_progress=False)
        if native:  # the compiled step runs float32 activations: its ground truth is the reference kernel
            set_kernels(model, "reference")
    p = _prompt()
    dec = FastDecoder(model, max_len=96, native=native)
    assert dec.native_layers == (2 if native else 0) and dec.native_head == native
    logits = dec(p)
    with torch.no_grad():
        ref = model(p[None]).logits[0, -1]
    assert (logits - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    fast, _ = fast_greedy_decode(dec, p, 64)
    plain, _ = greedy_decode(model, p, 64)
    assert torch.equal(fast, plain)
    # every one-token step's logits along the greedy path (the compiled step when native)
    worst = worst_step_error(dec, model, p, plain)
    if native or quant is None:  # (cpu-int4 / cpu-int8 round activations to bf16, by rows: not comparable)
        assert worst < 1e-5, worst  # measured 3e-7 .. 6e-7 (float32 rounding)
    # a block of several tokens after the prompt is causal within itself
    dec.reset()
    dec(p[:5])
    blk = dec(p[5:])
    assert (blk - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    assert dec.fallbacks == []


@pytest.mark.parametrize("quant", [dict(bits=4, group_size=64, sym=False), dict(bits=3, group_size=32),
                                   dict(bits=8, group_size=32)])
def test_native_step_layouts_and_threads(quant):
    """asym zero points, 3-bit codes, grouped 8-bit; two threads give the same tokens as one."""
    model = polyquant.quantize(tiny_llama(layers=2), polyquant.RTNConfig(**quant), show_progress=False)
    set_kernels(model, "reference")
    p = _prompt()
    dec = FastDecoder(model, max_len=96)
    assert dec.native_layers == 2 and dec.native_head and dec.fallbacks == []
    plain, _ = greedy_decode(model, p, 64)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fast, _ = fast_greedy_decode(dec, p, 64)
            assert torch.equal(fast, plain), threads
    finally:
        torch.set_num_threads(old)


def test_a_layer_the_native_step_cannot_take_runs_in_python_and_is_recorded():
    model = polyquant.quantize(tiny_llama(layers=3), polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    set_kernels(model, "reference")
    layer = model.model.layers[1]  # a 5-bit down projection: no cpu-gemv layout
    w = layer.mlp.down_proj.weight.detach()
    layer.mlp.down_proj = polyquant.QuantLinear(rtn_quantize(w, polyquant.RTNConfig(bits=5, group_size=32)),
                                                kernel="reference")
    p = _prompt()
    dec = FastDecoder(model, max_len=96)
    assert dec.native_layers == 2 and dec.native_head
    assert len(dec.fallbacks) == 1 and dec.fallbacks[0].startswith("layer 1: Python step (down:")
    plain, _ = greedy_decode(model, p, 64)
    fast, _ = fast_greedy_decode(dec, p, 64)
    assert torch.equal(fast, plain)


def test_native_false_and_a_bf16_head():
    from polyquant.nn.runtime import set_float_dtype
    model = polyquant.quantize(tiny_llama(layers=2), polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    set_kernels(model, "reference")
    set_float_dtype(model, torch.bfloat16, scope="lm_head")
    p = _prompt()
    dec = FastDecoder(model, max_len=96)
    assert dec.native_head and dec.fallbacks == []  # the bf16 head computes as torch.mv does (bf16 in/out)
    plain, _ = greedy_decode(model, p, 64)
    fast, _ = fast_greedy_decode(dec, p, 64)
    assert torch.equal(fast, plain)
    off = FastDecoder(model, max_len=96, native=False)
    assert off.native_layers == 0 and not off.native_head and off.info["native_layers"] == 0


def test_unfusable_siblings_run_one_by_one_and_are_recorded():
    model = polyquant.quantize(tiny_llama(layers=1), polyquant.RTNConfig(bits=4, group_size=32),
                               show_progress=False)
    set_kernels(model, "reference")  # (the fast runtime's float32 layers: compared with the reference kernel)
    attn = model.model.layers[0].self_attn
    qw = attn.k_proj.quantized_weight
    mask = torch.zeros(qw.shape, dtype=torch.bool)
    mask[0, 0] = True
    qw2 = QuantizedWeight.from_tensors(qw.qtype, qw.shape, qw.block, qw.tensors())
    qw2.outliers = SparseOutliers.from_dense_mask(torch.full(qw.shape, 0.5), mask)
    attn.k_proj = polyquant.QuantLinear(qw2)
    p = _prompt()
    dec = FastDecoder(model, max_len=64)
    assert any("q/k/v" in f for f in dec.fallbacks)
    assert "layer 0: Python step (qkv members run one by one)" in dec.fallbacks and dec.native_head
    with torch.no_grad():
        ref = model(p[None]).logits[0, -1]
    assert torch.allclose(dec(p), ref, atol=1e-4)


def test_refusals_name_the_reason():
    from tests.helpers import tiny_bert
    assert "decoder-only" in fast_decode_reason(tiny_bert())
    with pytest.raises(ValueError, match="KV cache full"):
        dec = FastDecoder(tiny_llama(layers=1), max_len=8)
        dec(_prompt(9))


def test_decode_steps_allocate_nothing_that_grows():
    dec = FastDecoder(tiny_llama(layers=2), max_len=200)
    dec(_prompt())
    cache_ptr = dec.k_cache.data_ptr()
    import gc
    import tracemalloc
    tracemalloc.start()
    tok = torch.tensor([3])
    for _ in range(20):
        dec(tok)
    gc.collect()
    a, _ = tracemalloc.get_traced_memory()
    for _ in range(100):
        dec(tok)
    gc.collect()
    b, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dec.k_cache.data_ptr() == cache_ptr  # the static cache is never reallocated
    assert b - a < 64 * 1024  # Python-side memory does not grow with the tokens decoded


def test_eval_decode_runtime_is_recorded():
    from polyquant.eval.speed import decode_tok_s
    model = tiny_llama(layers=1)
    fast = decode_tok_s(model, _prompt(), 8, runs=1, runtime="fast")
    assert fast["decode_runtime"] == "fast" and fast["decode_runtime_fallbacks"] == []
    from tests.helpers import tiny_bert  # noqa: F401
    with pytest.raises(ValueError, match="runtime must be one of"):
        decode_tok_s(model, _prompt(), 8, runtime="turbo")
