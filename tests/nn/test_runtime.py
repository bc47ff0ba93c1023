"""Runtime options (polyquant.nn.runtime): fused projections are exact and reversible; the float
head / float parts cast is recorded, bounded and leaves the quantized weights alone."""
import copy

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

from polyquant.eval.memory import weight_bytes
from polyquant.methods.rtn import RTNConfig
from polyquant.methods.apply import quantize_model
from polyquant.nn import QuantLinear, kernel_summary
from polyquant.nn import runtime as rt


def _quantized(make=tiny_llama, bits=4, sym=False):
    m = make(hidden=128)
    cfg = RTNConfig(bits=bits, group_size=64 if bits == 4 else -1, sym=sym)
    return quantize_model(m, cfg, show_progress=False)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("make,bits", [(tiny_llama, 4), (tiny_llama, 8), (tiny_qwen2, 4)])
def test_fuse_is_exact_and_unfuse_restores(make, bits):
    q = _quantized(make, bits)
    ids = torch.randint(0, 256, (1, 12))
    ref = _logits(q, ids)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    f = copy.deepcopy(q)
    assert rt.fuse_projections(f) == 4  # 2 layers x (q/k/v, gate/up)
    assert sum(kernel_summary(f).values()) == 8 and sum(kernel_summary(q).values()) == 14
    assert weight_bytes(f) == weight_bytes(q)
    assert torch.equal(_logits(f, ids), ref)  # same codes, same scales, same kernel: bit-identical
    assert rt.runtime_info(f)["fused_projections"] == 4
    assert rt.unfuse_projections(f) == 4
    after = f.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(_logits(f, ids), ref)
    assert rt.runtime_info(f)["fused_projections"] == 0
    if make is tiny_qwen2:  # q/k/v biases survive the round trip, o_proj stays bias-free
        attn = f.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_fused_member_called_alone_matches_its_layer():
    q = _quantized()
    f = copy.deepcopy(q)
    rt.fuse_projections(f)
    x = torch.randn(1, 3, 128)
    attn_q, attn_f = q.model.layers[0].self_attn, f.model.layers[0].self_attn
    with torch.inference_mode():
        assert torch.equal(attn_f.v_proj(x), attn_q.v_proj(x))  # out of order: computed afresh
        y = torch.randn(1, 3, 128)
        assert torch.equal(attn_f.q_proj(y), attn_q.q_proj(y))
        assert torch.equal(attn_f.k_proj(x), attn_q.k_proj(x))  # a different tensor than the cached one


def test_fuse_skips_mixed_layouts():
    q = _quantized()
    layer = q.model.layers[0].self_attn
    qw = layer.k_proj.quantized_weight
    from polyquant.methods.rtn import rtn_quantize
    w = qw.dequantize()
    layer.k_proj = QuantLinear(rtn_quantize(w, RTNConfig(bits=4, group_size=32)))  # another block
    assert rt.fuse_projections(q) == 3  # layer 0's q/k/v left alone


def test_float_head_bf16_is_recorded_tied_and_bounded():
    q = _quantized(sym=True)
    ids = torch.randint(0, 256, (1, 12))
    ref = _logits(q, ids)
    g = copy.deepcopy(q)
    info = rt.set_float_dtype(g, torch.bfloat16, scope="lm_head")
    assert info == {"float_compute": "bf16", "float_compute_scope": "lm_head", "fused_projections": 0}
    assert g.polyquant.extra["float_compute"] == "bf16"
    assert isinstance(g.lm_head, rt.FloatHead) and g.lm_head.weight.dtype == torch.bfloat16
    assert g.lm_head.weight is g.model.embed_tokens.weight  # still tied, one table
    assert g.model.norm.weight.dtype == torch.float32
    for m in g.modules():  # quantized weights untouched
        if isinstance(m, QuantLinear):
            assert m.qw_scale.dtype == torch.float32
    y = _logits(g, ids)
    assert y.dtype == torch.float32
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-2  # a bf16 cast: changes results, but by little
    # the single-row (torch.mv) path and the multi-row (F.linear) path agree
    h = torch.randn(3, 128)
    with torch.inference_mode():
        rows = torch.stack([g.lm_head(h[i:i + 1])[0] for i in range(3)])
        torch.testing.assert_close(rows, g.lm_head(h), rtol=1e-2, atol=1e-2)


def test_float_dtype_all_casts_float_parts_only():
    q = _quantized(sym=True)
    ids = torch.randint(0, 256, (1, 12))
    ref = _logits(q, ids)
    g = copy.deepcopy(q)
    rt.set_float_dtype(g, torch.bfloat16, scope="all")
    assert g.model.norm.weight.dtype == torch.bfloat16 and g.model.embed_tokens.weight.dtype == torch.bfloat16
    for m in g.modules():
        if isinstance(m, QuantLinear):
            assert m.qw_scale.dtype == torch.float32
    y = _logits(g, ids)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_float_dtype_validation():
    q = _quantized()
    with pytest.raises(ValueError, match="dtype"):
        rt.set_float_dtype(q, torch.int8)
    with pytest.raises(ValueError, match="scope"):
        rt.set_float_dtype(q, torch.bfloat16, scope="head")
    rt.set_float_dtype(q, torch.bfloat16, scope="lm_head")
    rt.set_float_dtype(q, torch.bfloat16, scope="lm_head")  # same setting again: no-op
    with pytest.raises(ValueError, match="already set"):
        rt.set_float_dtype(q, torch.float16, scope="lm_head")
    full = quantize_model(tiny_llama(hidden=128), RTNConfig(bits=4, group_size=64, quantize_lm_head=True),
                          show_progress=False)
    with pytest.raises(ValueError, match="unquantized"):
        rt.set_float_dtype(full, torch.bfloat16, scope="lm_head")


def test_runtime_info_of_a_float_model():
    m = tiny_llama()
    assert rt.runtime_info(m) == {"float_compute": "fp32", "float_compute_scope": None, "fused_projections": 0}
    rt.set_float_dtype(m, torch.bfloat16, scope="lm_head")
    assert rt.runtime_info(m)["float_compute"] == "bf16"
