"""quantize_model on tiny decoder and encoder models: targets, heads, source untouched, and the
quantized model computing exactly what a float model holding the dequantized weights computes."""
import copy

import pytest
import torch
from torch import nn

from helpers import AUTO_INT4, tiny_bert, tiny_llama, tiny_qwen2
from polyquant.methods import RTNConfig
from polyquant.methods.apply import quantize_model
from polyquant.nn import QuantLinear, kernel_summary, set_kernels

LLAMA_NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
BERT_NAMES = [f"encoder.layer.{i}.{m}" for i in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]
MODELS = {"llama": (tiny_llama, LLAMA_NAMES), "qwen2": (tiny_qwen2, LLAMA_NAMES), "bert": (tiny_bert, BERT_NAMES)}
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7]])


def _out(model, ids=IDS):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _dequantized_float_copy(source: nn.Module, quantized: nn.Module, names) -> nn.Module:
    """The source model with each quantized Linear's weight replaced by its dequantize()."""
    ref = copy.deepcopy(source)
    for n in names:
        q = quantized.get_submodule(n)
        lin = ref.get_submodule(n)
        lin.weight = nn.Parameter(q.quantized_weight.dequantize(), requires_grad=False)  # unties if tied
        if lin.bias is not None:
            assert torch.equal(q.bias, lin.bias)
    return ref


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


@pytest.mark.parametrize("family", list(MODELS))
def test_default_targets_and_exact_dequantized_equivalence(family):
    make, names = MODELS[family]
    src = make()
    before = _snapshot(src)
    cfg = RTNConfig(bits=4, group_size=32, sym=False)
    q = quantize_model(src, cfg, show_progress=False, kernel="reference")

    # exactly the Linears inside the repeated blocks, recorded
    assert [n for n, m in q.named_modules() if isinstance(m, QuantLinear)] == names
    assert q.polyquant.method == "rtn" and q.polyquant.modules == names and q.polyquant.config == cfg.to_dict()
    # heads / pooler / embeddings kept float
    assert all(type(m) is nn.Linear for n, m in q.named_modules() if n not in names and isinstance(m, nn.Linear))
    if family != "bert":
        assert type(q.lm_head) is nn.Linear
    if family == "qwen2":
        assert q.get_submodule("model.layers.0.self_attn.q_proj").bias is not None

    # the source model is untouched: same tensors, same module types, no record
    after = _snapshot(src)
    assert before[1] == after[1] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert not hasattr(src, "polyquant")

    # the reference kernel computes what a float model with the dequantized weights computes
    ref = _dequantized_float_copy(src, q, names)
    diff = float((_out(q) - _out(ref)).abs().max())
    assert diff < 1e-5, diff
    # and quantization did change the output (a no-op would pass the line above)
    assert float((_out(q) - _out(src)).abs().max()) > 1e-3


def test_quantize_lm_head_with_tied_embedding():
    src = tiny_llama(tie=True)
    assert src.lm_head.weight is src.model.embed_tokens.weight
    emb = src.model.embed_tokens.weight.detach().clone()
    q = quantize_model(src, RTNConfig(bits=4, group_size=32, quantize_lm_head=True),
                       show_progress=False, kernel="reference")
    assert isinstance(q.lm_head, QuantLinear) and q.polyquant.modules == LLAMA_NAMES + ["lm_head"]
    # the tied embedding stays float and unchanged
    assert type(q.model.embed_tokens) is nn.Embedding and torch.equal(q.model.embed_tokens.weight, emb)
    ref = _dequantized_float_copy(src, q, LLAMA_NAMES + ["lm_head"])
    assert torch.equal(ref.model.embed_tokens.weight, emb)
    logits = _out(q)
    assert logits.shape == (1, 8, 256) and bool(torch.isfinite(logits).all())
    assert float((logits - _out(ref)).abs().max()) < 1e-5
    # the source keeps its tie
    assert src.lm_head.weight is src.model.embed_tokens.weight and type(src.lm_head) is nn.Linear


def test_include_exclude():
    src = tiny_llama()
    q = quantize_model(src, RTNConfig(include=[r"mlp\."], exclude=["down_proj"]), show_progress=False)
    quant = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert quant == [n for n in LLAMA_NAMES if ".mlp." in n and "down_proj" not in n]
    assert type(q.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(q.model.layers[0].mlp.down_proj) is nn.Linear


def test_no_matching_layer_and_bad_input():
    src = tiny_llama()
    with pytest.raises(ValueError, match="no Linear layer matched"):
        quantize_model(src, RTNConfig(include=["nothing_is_called_this"]), show_progress=False)
    with pytest.raises(ValueError, match="no Linear layer matched"):
        quantize_model(src, RTNConfig(exclude=[".*"]), show_progress=False)
    with pytest.raises(ValueError, match="config"):
        quantize_model(src, {"method": "rtn"}, show_progress=False)
    q = quantize_model(src, RTNConfig(), show_progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, RTNConfig(), show_progress=False)


def test_inplace_and_kernel_selection():
    src = tiny_llama()
    ref_out = _out(src)
    q = quantize_model(src, RTNConfig(bits=4, group_size=32), inplace=True, show_progress=False)
    assert q is src and isinstance(src.model.layers[0].mlp.up_proj, QuantLinear)
    # every layer of the tiny llama (out 32/64/128, in 64/128, g32) fits cpu-int4
    assert kernel_summary(q) == {AUTO_INT4: len(LLAMA_NAMES)}
    assert f"kernel={AUTO_INT4}" in repr(q)
    fast = _out(q)
    assert set_kernels(q, "reference") == {"reference": len(LLAMA_NAMES)}
    exact = _out(q)
    assert "kernel=cpu-int4" not in repr(q) and "kernel=reference" in repr(q)
    # bf16 fast path vs fp32 reference through the whole model: max |diff| / max |logit|
    # measured 1.7e-3 .. 2.4e-3 (seeds 0-2)
    assert float((fast - exact).abs().max() / exact.abs().max()) < 1e-2
    assert float((exact - ref_out).abs().max()) > 1e-3
