"""Act-order (g_idx) layers in the fast runtime: GPTQ gives sibling projections (q/k/v, gate/up)
equal g_idx, so ``fuse_projections`` stacks them into one ``cpu-int4-actorder`` layer that gathers
the input once. Siblings with different g_idx must stay separate; fused and unfused give the same
logits; the kernel's decode (one row) and multi-row gathers match the reference kernel."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import AUTO_INT4_ACTORDER, sqnr_db, tiny_llama, tiny_qwen2

import polyquant
from polyquant.methods import GPTQConfig
from polyquant.nn import QuantLinear, kernel_summary, set_kernels
from polyquant.nn import runtime as rt
from polyquant.tensor.quantized_weight import QuantizedWeight

_CACHE: dict[str, torch.nn.Module] = {}


def _calib(n=4, seqlen=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def _gptq_actorder(make=tiny_llama):
    if make.__name__ not in _CACHE:
        _CACHE[make.__name__] = polyquant.quantize(make(hidden=128), GPTQConfig(bits=4, group_size=32, act_order=True),
                                                   calibration=_calib(), show_progress=False)
    return copy.deepcopy(_CACHE[make.__name__])


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _siblings(model):
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        yield a.q_proj, a.k_proj, a.v_proj
        yield m.gate_proj, m.up_proj


def _reorder(qw: QuantizedWeight, seed: int) -> QuantizedWeight:
    """The same layer (same ``x @ W.T``) with its groups assigned to other columns: a different,
    valid act-order g_idx. Columns are exchanged between groups, codes and g_idx moving together,
    and the scales of the groups swapped accordingly -- i.e. a genuinely different weight; here it
    only has to be valid and different, its values need not match the original."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randperm(qw.shape[1], generator=g)
    return QuantizedWeight.from_codes(qw.codes[:, p], qw.qtype, qw.block, qw.scale, qw.zero, qw.g_idx[p])


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_gptq_actorder_siblings_fuse_exactly(make):
    q = _gptq_actorder(make)
    assert kernel_summary(q) == {AUTO_INT4_ACTORDER: 14}
    for group in _siblings(q):  # one Hessian per shared input -> one act-order permutation
        g0 = group[0].quantized_weight.g_idx
        assert g0 is not None and not torch.equal(g0, torch.arange(128, dtype=g0.dtype) // 32)
        assert all(torch.equal(m.quantized_weight.g_idx, g0) for m in group)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(q, ids)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    f = copy.deepcopy(q)
    assert rt.fuse_projections(f) == 4
    assert kernel_summary(f) == {AUTO_INT4_ACTORDER: 8}
    fused = f.model.layers[0].self_attn.q_proj.fused
    assert isinstance(fused, QuantLinear) and fused.kernel_name == AUTO_INT4_ACTORDER
    assert torch.equal(fused.quantized_weight.g_idx, q.model.layers[0].self_attn.q_proj.quantized_weight.g_idx)
    assert torch.equal(_logits(f, ids), ref)  # one gather + one matmul over stacked rows: bit-identical
    # and both agree with the reference kernel (dequantize + matmul in the original column order)
    r = copy.deepcopy(q)
    set_kernels(r, "reference")
    assert sqnr_db(_logits(r, ids), ref) > 35
    # decode with a KV cache through the fused layers: same tokens as unfused
    with torch.inference_mode():
        a = q.generate(ids, max_new_tokens=6, do_sample=False)
        b = f.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert rt.unfuse_projections(f) == 4
    after = f.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # g_idx included
    assert kernel_summary(f) == {AUTO_INT4_ACTORDER: 14}
    assert torch.equal(_logits(f, ids), ref)


def test_siblings_with_different_g_idx_are_not_fused():
    q = _gptq_actorder()
    attn = q.model.layers[0].self_attn
    k = attn.k_proj
    attn.k_proj = QuantLinear(_reorder(k.quantized_weight, seed=3), k.bias)
    assert attn.k_proj.kernel_name == AUTO_INT4_ACTORDER
    assert not torch.equal(attn.k_proj.quantized_weight.g_idx, attn.q_proj.quantized_weight.g_idx)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _logits(q, ids)
    f = copy.deepcopy(q)
    assert rt.fuse_projections(f) == 3  # layer 0's q/k/v left alone
    assert isinstance(f.model.layers[0].self_attn.k_proj, QuantLinear)
    assert isinstance(f.model.layers[0].mlp.gate_proj, rt.FusedSlice)
    assert torch.equal(_logits(f, ids), ref)
    # what a wrong fusion (q's g_idx for k's columns) would give: visibly different logits
    wrong = copy.deepcopy(q)
    kq = wrong.model.layers[0].self_attn.k_proj.quantized_weight
    wrong.model.layers[0].self_attn.k_proj = QuantLinear(QuantizedWeight(
        kq.qtype, kq.shape, kq.block, kq.data, kq.scale, kq.zero, attn.q_proj.quantized_weight.g_idx.clone()))
    assert not torch.allclose(_logits(wrong, ids), ref, atol=1e-3)


def test_concat_refuses_mixed_act_order():
    q = _gptq_actorder()
    a = q.model.layers[0].self_attn
    qw = a.q_proj.quantized_weight
    plain = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, None)
    assert rt._concat([qw, plain]) is None and rt._concat([plain, qw]) is None
    assert rt._concat([qw, _reorder(a.k_proj.quantized_weight, seed=4)]) is None
    cat = rt._concat([qw, a.k_proj.quantized_weight, a.v_proj.quantized_weight])
    assert cat is not None and torch.equal(cat.g_idx, qw.g_idx)
    ref = torch.cat([m.quantized_weight.dequantize() for m in (a.q_proj, a.k_proj, a.v_proj)])
    assert torch.equal(cat.dequantize(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_actorder_kernel_gathers_every_input_shape(dtype):
    """The kernel's gather has a one-row (decode) form and a many-row form; both, on contiguous and
    strided inputs, match the reference kernel."""
    q = _gptq_actorder()
    layer = q.model.layers[1].mlp.down_proj  # 256 -> 128
    ref = QuantLinear(layer.quantized_weight, kernel="reference")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 5, 512, generator=g)
    inputs = [base[0, :1, :256], base[:1, :1, :256], base[0, 0, :256].reshape(1, 256),
              base[:, :, ::2],  # strided rows
              base[:1, :1, ::2],  # strided single row
              base[:, 1, 256:]]
    with torch.inference_mode():
        for x in inputs:
            x = x.to(dtype)
            y, y_ref = layer(x), ref(x.float())
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], 128)
            assert sqnr_db(y_ref, y.float()) > 40, tuple(x.shape)
