"""torchao safetensors format: int4 nibble packing on a hand-checked example, exact save -> load per
recipe, the on-disk layout (flattened ``_weight_*`` tensors, header metadata, quant_type), refusals,
and (with torchao installed) transformers + torchao loading our checkpoints and polyquant loading
torchao's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import polyquant
from helpers import tiny_llama
from polyquant.formats.torchao import pack_int4, unpack_int4
from polyquant.methods.torchao import (TorchAOFloat8Config, TorchAOInt4Config, TorchAOInt8Config,
                                       TorchAOInt8DynamicConfig)

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(8))
CASES = {
    "int4-g32": TorchAOInt4Config(group_size=32),
    "int8": TorchAOInt8Config(),
    "int8-tensor": TorchAOInt8Config(granularity="tensor"),
    "int8-dyn": TorchAOInt8DynamicConfig(),
    "fp8": TorchAOFloat8Config(),
    "fp8-dyn": TorchAOFloat8Config(activations="float8"),
    "fp8-dyn-row": TorchAOFloat8Config(activations="float8", granularity="row", activation_value_ub=100.0),
}


def test_int4_packing_hand_checked():
    # u = [0, 15, 8, 7] is q = u - 8 = [-8, 7, 0, -1]; byte 0 = (-8 & 0xF) | (7 << 4) = 0x78,
    # byte 1 = 0 | (-1 & 0xF) << 4 = 0xF0 = -16 as int8
    u = torch.tensor([[0, 15, 8, 7]], dtype=torch.uint8)
    p = pack_int4(u)
    assert p.dtype == torch.int8 and p.tolist() == [[0x78, -16]]
    assert torch.equal(unpack_int4(p), u)
    r = torch.randint(0, 16, (8, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(r)), r)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_identical_logits(llama, case, tmp_path):
    q = polyquant.quantize(llama, CASES[case], show_progress=False)
    out = polyquant.save(q, tmp_path / "ck")
    q2, _ = polyquant.load(out)
    for n, m in q.named_modules():
        if hasattr(m, "quantized_weight"):
            a, b = m.quantized_weight, q2.get_submodule(n).quantized_weight
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
            assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))
            assert q2.get_submodule(n).kernel_name == m.kernel_name
    with torch.no_grad():
        assert torch.equal(q(X).logits, q2(X).logits)


def _meta(out):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_int4_layout(llama, tmp_path):
    q = polyquant.quantize(llama, TorchAOInt4Config(group_size=32), show_progress=False)
    out = polyquant.save(q, tmp_path / "ck")
    meta, t = _meta(out)
    p = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert t[f"{p}._weight_qdata"].dtype == torch.int8 and t[f"{p}._weight_qdata"].shape == (64, 64)
    assert t[f"{p}._weight_scale"].shape == (4, 64) and t[f"{p}._weight_zero_point"].shape == (4, 64)
    assert f"{p}.weight" not in t
    qw = q.get_submodule(p).quantized_weight
    assert torch.equal(t[f"{p}._weight_scale"], qw.scale.t())
    assert torch.equal(t[f"{p}._weight_zero_point"], ((8 - qw.zero) * qw.scale.double()).float().t())
    entry = json.loads(meta[f"{p}.weight"])
    assert entry == {"_type": "Int4Tensor", "_data": {"block_size": [1, 32], "shape": [64, 128]},
                     "_tensor_data_names": ["qdata", "scale", "zero_point"]}
    names = json.loads(meta["tensor_names"])
    assert f"{p}.weight" in names and "model.embed_tokens.weight" in names and len(names) == 14 + 5 + 1
    assert json.loads(meta["model.embed_tokens.weight"]) == {"_type": "Tensor"}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_type"]["default"]["_type"] == "Int4WeightOnlyConfig"
    assert cfg["quant_type"]["default"]["_data"]["group_size"] == 32
    assert cfg["modules_to_not_convert"] == ["lm_head"] and cfg["quant_method"] == "torchao"


def test_int8_dynamic_and_float8_metadata(llama, tmp_path):
    out = polyquant.save(polyquant.quantize(llama, TorchAOInt8DynamicConfig(), show_progress=False), tmp_path / "a")
    meta, t = _meta(out)
    p = "model.layers.1.self_attn.o_proj"
    e = json.loads(meta[f"{p}.weight"])
    assert e["_type"] == "Int8Tensor" and e["_tensor_data_names"] == ["qdata", "scale"]
    assert e["_data"]["act_quant_kwargs"]["_type"] == "QuantizeTensorToInt8Kwargs"
    assert e["_data"]["dtype"] == {"_type": "torch.dtype", "_data": "float32"}
    assert t[f"{p}._weight_scale"].dtype == torch.float32 and t[f"{p}._weight_scale"].shape == (64, 1)
    out = polyquant.save(polyquant.quantize(llama, CASES["fp8-dyn"], show_progress=False), tmp_path / "b")
    meta, t = _meta(out)
    e = json.loads(meta[f"{p}.weight"])
    assert e["_type"] == "Float8Tensor" and e["_data"]["block_size"] == [64, 64]
    assert e["_data"]["act_quant_kwargs"]["_data"]["granularity"] == {"_type": "PerTensor", "_data": {}}
    assert t[f"{p}._weight_qdata"].dtype == torch.float8_e4m3fn and t[f"{p}._weight_scale"].shape == (1, 1)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_type"]["default"]["_type"] == "Float8DynamicActivationFloat8WeightConfig"


def test_mixed_layers_use_fqn_to_config(llama, tmp_path):
    a = polyquant.quantize(llama, TorchAOInt8Config(include=[r".*mlp.*"]), show_progress=False)
    b = polyquant.quantize(llama, TorchAOInt4Config(group_size=32, include=[r".*self_attn.*"]), show_progress=False)
    for n, m in b.named_modules():  # graft the attention layers of b into a
        if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            parent, _, child = n.rpartition(".")
            setattr(a.get_submodule(parent), child, m)
    out = polyquant.save(a, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["quant_type"]["default"]
    assert cfg["_type"] == "FqnToConfig"
    table = cfg["_data"]["fqn_to_config"]
    assert table["model.layers.0.mlp.up_proj"]["_type"] == "Int8WeightOnlyConfig"
    assert table["model.layers.0.self_attn.q_proj"]["_type"] == "Int4WeightOnlyConfig"
    a2, _ = polyquant.load(out)
    with torch.no_grad():
        assert torch.equal(a(X).logits, a2(X).logits)


def test_refusals(llama, tmp_path):
    r = polyquant.quantize(llama, polyquant.RTNConfig(bits=8, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="per row or per tensor"):
        polyquant.save(r, tmp_path / "a", format="torchao")
    r3 = polyquant.quantize(llama, polyquant.RTNConfig(bits=3, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="torchao stores"):
        polyquant.save(r3, tmp_path / "b", format="torchao")


def test_rtn_int4_is_stored_with_a_float_zero(llama, tmp_path):
    r = polyquant.quantize(llama, polyquant.RTNConfig(bits=4, group_size=64, sym=False), show_progress=False)
    out = polyquant.save(r, tmp_path / "ck", format="torchao")
    r2, _ = polyquant.load(out)
    with torch.no_grad():  # integer zeros become float zero points (rounded to the scale dtype)
        assert torch.allclose(r(X).logits, r2(X).logits, atol=1e-5, rtol=0)


# -- with torchao ---------------------------------------------------------------------------
def _torchao_with_safetensors():
    ao = pytest.importorskip("torchao", reason="torchao is not installed")
    try:
        from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
    except ImportError:
        pytest.skip(f"torchao {ao.__version__} cannot read safetensors checkpoints")
    if "Int8Tensor" not in ALLOWED_TENSORS_SUBCLASSES:
        pytest.skip(f"torchao {ao.__version__} does not read Int8Tensor from safetensors (needs >= 0.16)")
    return ao


@pytest.mark.parametrize("case", ["int8", "int8-tensor", "int8-dyn", "fp8", "fp8-dyn", "fp8-dyn-row"])
def test_transformers_torchao_load_our_checkpoint(llama, case, tmp_path):
    _torchao_with_safetensors()
    from transformers import AutoModelForCausalLM
    ours = polyquant.quantize(llama, CASES[case], show_progress=False)
    if case in ("int8", "int8-tensor"):
        polyquant.set_kernels(ours, "reference")  # float32 activations as torchao's weight-only linear
    out = polyquant.save(ours, tmp_path / "ck")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert type(theirs.model.layers[0].self_attn.q_proj.weight).__name__ in ("Int8Tensor", "Float8Tensor")
    with torch.no_grad():
        assert torch.allclose(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=0)


def test_transformers_torchao_rebuild_our_int4(llama, tmp_path):
    """Int4Tensor's matmul needs mslk (CUDA); check the tensors torchao rebuilds instead."""
    _torchao_with_safetensors()
    from transformers import AutoModelForCausalLM
    ours = polyquant.quantize(llama, CASES["int4-g32"], show_progress=False)
    out = polyquant.save(ours, tmp_path / "ck")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    w = theirs.model.layers[1].mlp.up_proj.weight
    assert type(w).__name__ == "Int4Tensor" and list(w.block_size) == [1, 32] and tuple(w.shape) == (128, 64)
    qw = ours.model.layers[1].mlp.up_proj.quantized_weight
    deq = (unpack_int4(w.qdata).float() - 8) * w.scale.t().repeat_interleave(32, 1) \
        + w.zero_point.t().repeat_interleave(32, 1)
    assert torch.allclose(deq, qw.dequantize(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["int8", "fp8", "intx4"])
def test_polyquant_loads_torchao_checkpoint(which, tmp_path):
    _torchao_with_safetensors()
    from torchao.quantization import (Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig,
                                      PerGroup)
    from transformers import TorchAoConfig
    cfg = {"int8": Int8WeightOnlyConfig(), "fp8": Float8WeightOnlyConfig(),
           "intx4": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}[which]
    from transformers import AutoModelForCausalLM
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "float"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "float"), device_map="cpu",
                                                  quantization_config=TorchAoConfig(cfg))
    theirs.save_pretrained(str(tmp_path / "ao"))
    ours, _ = polyquant.load(tmp_path / "ao", kernel="reference")
    assert ours.polyquant.format == "torchao" and len(ours.polyquant.modules) == 14
    with torch.no_grad():
        assert torch.allclose(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=0)
