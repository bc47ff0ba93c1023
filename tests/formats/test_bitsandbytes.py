"""bitsandbytes format: the 4-bit packing and quant_state JSON on hand-checked layers, exact layer
round trips, save -> load logits for NF4 / NF4+DQ / FP4 / LLM.int8 on a tiny llama, refusals, and -
with bitsandbytes installed - checkpoints exchanged with transformers + bitsandbytes both ways."""
from __future__ import annotations

import json

import pytest
import torch

import polyquant
from helpers import tiny_llama
from polyquant.formats import CheckpointError, get_format
from polyquant.formats.bitsandbytes import (bnb4_layer_tensors, bnb4_weight_from_tensors, bnb8_layer_tensors,
                                            bnb8_weight_from_tensors)
from polyquant.kernels.bnb_int8 import LLMInt8Activation
from polyquant.methods.bnb import (BnbFP4Config, BnbInt8Config, BnbNF4Config, bnb_quantize_4bit, bnb_quantize_int8,
                                   code_book, dynamic_map)
from polyquant.methods.rtn import RTNConfig, rtn_quantize
from polyquant.tensor.quantized_weight import QuantizedWeight

QS = "weight.quant_state.bitsandbytes__"


def _json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def test_4bit_packing_and_quant_state_hand_checked():
    # a [1, 64] NF4 layer with codes 0..15, 0..15, ...: bytes 0x01, 0x23, ..., 0xEF repeated
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    qw = QuantizedWeight.from_codes(codes, "nf4", (1, 64), torch.tensor([[0.5]]))
    t = bnb4_layer_tensors(qw)
    assert set(t) == {"weight", "weight.absmax", "weight.quant_map", QS + "nf4"}
    assert t["weight"].dtype == torch.uint8 and tuple(t["weight"].shape) == (32, 1)
    assert t["weight"][:8, 0].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert t["weight.absmax"].tolist() == [0.5] and torch.equal(t["weight.quant_map"], code_book("nf4"))
    assert _json(t[QS + "nf4"]) == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [1, 64]}
    # an odd number of values (a [33, 1] weight, blocks of 32 rows) is zero padded in the last low nibble
    odd = QuantizedWeight.from_codes(torch.full((33, 1), 5, dtype=torch.uint8), "fp4", (32, 1),
                                     torch.tensor([[1.0], [2.0]]))
    t = bnb4_layer_tensors(odd)
    assert t["weight"][:, 0].tolist() == [0x55] * 16 + [0x50]
    assert torch.equal(bnb4_weight_from_tensors("l", t, 1, 33).dequantize(), odd.dequantize())


def test_double_quant_tensors():
    w = torch.randn(64, 256)
    qw = bnb_quantize_4bit(w, BnbNF4Config(double_quant=True))
    t = bnb4_layer_tensors(qw)
    assert set(t) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                      "weight.nested_quant_map", QS + "nf4"}
    assert t["weight.absmax"].dtype == torch.uint8 and t["weight.absmax"].shape == (256,)
    assert t["weight.nested_absmax"].shape == (1,) and torch.equal(t["weight.nested_quant_map"], dynamic_map())
    qs = _json(t[QS + "nf4"])
    assert qs["nested_blocksize"] == 256 and qs["nested_dtype"] == "float32"
    assert qs["nested_offset"] == qw.extras["nested_offset"].item()


@pytest.mark.parametrize("cfg", [BnbNF4Config(), BnbFP4Config(double_quant=True), BnbNF4Config(blocksize=128)])
@pytest.mark.parametrize("shape", [(64, 256), (48, 64), (33, 32)])
def test_4bit_layer_round_trip_exact(cfg, shape):
    if cfg.blocksize == 128 and shape[1] == 32:
        shape = (32, 32)  # 128 = 4 rows; the weight must hold whole blocks of rows or a short last one
    qw = bnb_quantize_4bit(torch.randn(shape), cfg)
    back = bnb4_weight_from_tensors("l", bnb4_layer_tensors(qw), shape[1], shape[0])
    assert back.qtype == qw.qtype and back.block == qw.block
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert set(back.extras) == set(qw.extras)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_int8_layer_tensors_and_round_trip():
    w = torch.randn(16, 48)
    qw = bnb_quantize_int8(w, BnbInt8Config())
    t = bnb8_layer_tensors(qw)
    assert set(t) == {"weight", "SCB", "weight_format"}
    assert t["weight"].dtype == torch.int8 and t["weight_format"].dtype == torch.uint8 and int(t["weight_format"]) == 0
    assert torch.equal(t["SCB"], w.half().abs().amax(1).float())
    back = bnb8_weight_from_tensors("l", t, 48, 16)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert torch.equal(back.extras["SCB"], qw.extras["SCB"])


@pytest.mark.parametrize("cfg", [BnbNF4Config(), BnbNF4Config(double_quant=True, compute_dtype="bfloat16"),
                                 BnbFP4Config(), BnbInt8Config(), BnbInt8Config(threshold=0.5)])
def test_save_load_identical_logits(tmp_path, cfg):
    model = tiny_llama()
    q = polyquant.quantize(model, cfg, show_progress=False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = q(ids).logits
    path = polyquant.save(q, tmp_path / "m")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    four = not isinstance(cfg, BnbInt8Config)
    assert qcfg["quant_method"] == "bitsandbytes"
    assert qcfg["load_in_4bit"] is four and qcfg["load_in_8bit"] is (not four)
    assert qcfg["_load_in_4bit"] is four and qcfg["llm_int8_skip_modules"] == ["lm_head"]
    assert isinstance(qcfg["llm_int8_threshold"], float) and qcfg["bnb_4bit_quant_storage"] == "uint8"
    if four:
        assert qcfg["bnb_4bit_quant_type"] == cfg.quant_type
        assert qcfg["bnb_4bit_use_double_quant"] is cfg.double_quant
        assert qcfg["bnb_4bit_compute_dtype"] == cfg.compute_dtype
    else:
        assert qcfg["llm_int8_threshold"] == cfg.threshold
    q2, _ = polyquant.load(path)
    with torch.no_grad():
        out = q2(ids).logits
    assert torch.equal(out, ref)
    layer = q2.model.layers[0].mlp.down_proj
    if not four:
        assert layer.kernel_name == "llm-int8" and isinstance(layer.act_quant, LLMInt8Activation)
        assert layer.act_quant.threshold == cfg.threshold
    assert polyquant.checkpoint_info(path)["quantized_layers"] == 14


def test_foreign_int8_checkpoint_gets_the_threshold_from_the_config(tmp_path):
    model = tiny_llama()
    q = polyquant.quantize(model, BnbInt8Config(threshold=2.0), show_progress=False)
    path = polyquant.save(q, tmp_path / "m")
    (path / "polyquant.json").unlink()  # as if another tool wrote it
    q2, _ = polyquant.load(path)
    layer = q2.model.layers[1].self_attn.o_proj
    assert layer.method == "bnb-int8" and layer.act_quant.threshold == 2.0
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(q2(ids).logits, q(ids).logits)


def test_unquantized_linears_are_listed_as_skip_modules(tmp_path):
    model = tiny_llama()
    q = polyquant.quantize(model, BnbNF4Config(exclude=[r"layers\.1\.mlp"]), show_progress=False)
    qcfg = get_format("bitsandbytes").quantization_config(
        q, {n: m for n, m in q.named_modules() if isinstance(m, polyquant.QuantLinear)})
    assert qcfg["llm_int8_skip_modules"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                             "model.layers.1.mlp.down_proj", "lm_head"]


def test_refusals():
    fmt = get_format("bitsandbytes")
    rtn = rtn_quantize(torch.randn(16, 64), RTNConfig(bits=4, group_size=32, sym=False))
    assert "nf4 / fp4" in fmt.check_layer("l", rtn, None)
    good = bnb_quantize_4bit(torch.randn(16, 64), BnbNF4Config())
    t = bnb4_layer_tensors(good)
    bad_map = dict(t, **{"weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(CheckpointError, match="code book"):
        bnb4_weight_from_tensors("l", bad_map, 64, 16)
    with pytest.raises(CheckpointError, match="shape"):
        bnb4_weight_from_tensors("l", t, 32, 32)
    with pytest.raises(CheckpointError, match="bytes"):
        bnb4_weight_from_tensors("l", dict(t, weight=t["weight"][:-1]), 64, 16)
    qs = _json(t[QS + "nf4"])
    blob = torch.tensor(list(json.dumps(dict(qs, blocksize=64, shape=[8, 96])).encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="in_features=96"):
        bnb4_weight_from_tensors("l", {**t, QS + "nf4": blob, "weight": torch.zeros(384, 1, dtype=torch.uint8),
                                       "weight.absmax": torch.ones(12)}, 96, 8)
    with pytest.raises(CheckpointError, match="exactly one"):
        bnb4_weight_from_tensors("l", {**t, QS + "fp4": t[QS + "nf4"]}, 64, 16)
    i8 = bnb8_layer_tensors(bnb_quantize_int8(torch.randn(8, 16), BnbInt8Config()))
    with pytest.raises(CheckpointError, match="weight_format 1"):
        bnb8_weight_from_tensors("l", dict(i8, weight_format=torch.tensor(1, dtype=torch.uint8)), 16, 8)
    with pytest.raises(CheckpointError, match="fp16_weight"):
        fmt.quantized_layers({"quant_method": "bitsandbytes", "llm_int8_has_fp16_weight": True}, None, set())
    with pytest.raises(CheckpointError, match="load_in_8bit"):
        fmt.quantized_layers({"quant_method": "bitsandbytes", "load_in_8bit": True}, torch.nn.Module(),
                             {"a.weight.absmax"})


# -- with transformers + bitsandbytes ------------------------------------------------------------

def _hf_bnb():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    return AutoModelForCausalLM, BitsAndBytesConfig


@pytest.mark.parametrize("cfg", [BnbNF4Config(double_quant=True), BnbFP4Config()])
def test_transformers_reads_our_4bit_checkpoint(tmp_path, cfg):
    auto, _ = _hf_bnb()
    import bitsandbytes.functional as F
    model = tiny_llama()
    q = polyquant.quantize(model, cfg, show_progress=False)
    path = polyquant.save(q, tmp_path / "m")
    hf = auto.from_pretrained(str(path), dtype=torch.float32)
    ours = q.model.layers[1].mlp.down_proj.quantized_weight
    theirs = hf.model.layers[1].mlp.down_proj.weight
    assert type(theirs).__name__ == "Params4bit"
    assert torch.equal(F.dequantize_4bit(theirs.data, theirs.quant_state), ours.dequantize())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = q(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()  # bitsandbytes' CPU matmul rounds differently


def test_we_read_a_transformers_bitsandbytes_checkpoint(tmp_path):
    auto, bnb_cfg = _hf_bnb()
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp")
    hf = auto.from_pretrained(str(tmp_path / "fp"), dtype=torch.float32, quantization_config=bnb_cfg(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    hf.save_pretrained(tmp_path / "hf")
    q, _ = polyquant.load(tmp_path / "hf")
    assert q.polyquant.format == "bitsandbytes"
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.method == "bnb-nf4" and set(layer.quantized_weight.extras) >= {"absmax_q"}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = q(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() < 1e-2 * b.abs().max().item()
    # bitsandbytes quantized these weights; polyquant quantizing the same floats gives the same codes
    mine = bnb_quantize_4bit(model.model.layers[0].self_attn.q_proj.weight.data, BnbNF4Config(double_quant=True))
    assert torch.equal(mine.codes, layer.quantized_weight.codes)


def test_int8_checkpoint_both_ways(tmp_path):
    auto, bnb_cfg = _hf_bnb()
    model = tiny_llama()
    q = polyquant.quantize(model, BnbInt8Config(), show_progress=False)
    path = polyquant.save(q, tmp_path / "m")
    hf = auto.from_pretrained(str(path), dtype=torch.float32)
    lin = hf.model.layers[0].mlp.up_proj
    ours = q.model.layers[0].mlp.up_proj.quantized_weight
    assert torch.equal(lin.weight.data, (ours.codes.to(torch.int16) - 128).to(torch.int8))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = q(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()
    # transformers + bitsandbytes quantize the float model; we read their checkpoint
    model.save_pretrained(tmp_path / "fp")
    hq = auto.from_pretrained(str(tmp_path / "fp"), dtype=torch.float32,
                              quantization_config=bnb_cfg(load_in_8bit=True))
    hq.save_pretrained(tmp_path / "hf8")
    q8, _ = polyquant.load(tmp_path / "hf8")
    mine = q.model.layers[0].mlp.up_proj.quantized_weight
    theirs = q8.model.layers[0].mlp.up_proj.quantized_weight
    assert torch.equal(mine.codes, theirs.codes) and torch.equal(mine.extras["SCB"], theirs.extras["SCB"])
    assert q8.model.layers[0].mlp.up_proj.act_quant.threshold == 6.0
