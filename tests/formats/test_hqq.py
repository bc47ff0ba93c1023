"""HQQ format: hqq's bit packing on hand-checked rows, the encoded state-dict keys and types, exact
layer round trips, save -> load logits on a tiny llama, refusals, and - with the hqq library -
both directions against ``HQQLinear``'s own state dict."""
from __future__ import annotations

import json

import pytest
import torch

import polyquant
from helpers import tiny_llama
from polyquant.formats import CheckpointError, get_format
from polyquant.formats.hqq import hqq_layer_tensors, hqq_pack, hqq_unpack, hqq_weight_from_tensors, linear_tag
from polyquant.methods.hqq import HQQConfig, hqq_quantize
from polyquant.methods.rtn import RTNConfig, rtn_quantize

HQQ_KEYS = {"W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype",
            "view_as_float", "quant_scale", "quant_zero", "compute_dtype", "offload_meta", "encoded_state_dict",
            "stores_quant_config", "channel_wise", "optimize", "round_zero"}


def _str(t: torch.Tensor) -> str:
    return "".join(chr(c) for c in t.tolist())


def test_pack_hand_checked():
    q = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.uint8)
    # 4bit_u8: first half of the rows in the high nibble
    assert hqq_pack(q, "4bit_u8").tolist() == [[0x15, 0x26], [0x37, 0x48]]
    q2 = torch.tensor([[3], [2], [1], [0]], dtype=torch.uint8)
    assert hqq_pack(q2, "2bit_u8").tolist() == [[0b11100100]]
    q1 = torch.tensor([[1], [0], [1], [1], [0], [0], [0], [1]], dtype=torch.uint8)
    assert hqq_pack(q1, "1bit_u8").tolist() == [[0b10110001]]
    q3 = torch.tensor([[7], [1], [5]], dtype=torch.uint8)  # padded to 10 rows; row t at bit 27 - 3t
    w3 = hqq_pack(q3, "3bit_32")
    assert w3.dtype == torch.int32 and w3.tolist() == [[(7 << 27) | (1 << 24) | (5 << 21)]]
    assert hqq_pack(q, "8bit_u8").tolist() == q.tolist()
    for packing, bits, rows in (("4bit_u8", 4, 6), ("2bit_u8", 2, 8), ("1bit_u8", 1, 16), ("3bit_32", 3, 23),
                                ("8bit_u8", 8, 5)):
        c = torch.randint(0, 2 ** bits, (rows, 7), dtype=torch.uint8)
        assert torch.equal(hqq_unpack(hqq_pack(c, packing), packing, rows), c)


def test_layer_tensors_keys_and_encoding():
    w = torch.randn(32, 128)
    qw = hqq_quantize(w, HQQConfig(bits=4, group_size=64))
    t = hqq_layer_tensors(qw)
    assert set(t) == HQQ_KEYS
    assert t["W_q"].dtype == torch.uint8 and tuple(t["W_q"].shape) == (32 * 128 // 64 // 2, 64)
    assert tuple(t["scale"].shape) == (64, 1) and tuple(t["zero"].shape) == (64, 1)
    assert t["nbits"].dtype == torch.int32 and t["nbits"].dim() == 0 and int(t["nbits"]) == 4
    assert int(t["group_size"]) == 64 and int(t["axis"]) == 1
    assert t["shape"].dtype == torch.int64 and t["shape"].tolist() == [32, 128]
    assert _str(t["packing"]) == "4bit_u8" and _str(t["compute_dtype"]) == "torch.float32"
    assert _str(t["unpack_view_dtype"]) == "torch.uint8"
    assert t["encoded_state_dict"].dtype == torch.uint8 and int(t["encoded_state_dict"]) == 1
    assert int(t["round_zero"]) == 1 and int(t["quant_scale"]) == 0
    # W_q row r of the grouped [64, 64] codes: rows 0..31 high nibble, 32..63 low nibble
    grouped = qw.codes.reshape(-1, 64)
    assert torch.equal(t["W_q"], (grouped[:32] << 4) | grouped[32:])
    assert torch.equal(t["scale"].reshape(32, 2), qw.scale)


@pytest.mark.parametrize("bits,gs,axis", [(1, 32, 1), (2, 16, 1), (3, 64, 1), (4, 64, 1), (5, 32, 1), (6, 32, 1),
                                          (8, 64, 1), (4, -1, 1), (3, -1, 0), (4, -1, 0), (4, 256, 1)])
def test_layer_round_trip_exact(bits, gs, axis):
    w = torch.randn(40, 128)
    qw = hqq_quantize(w, HQQConfig(bits=bits, group_size=gs, axis=axis))
    back = hqq_weight_from_tensors("l", hqq_layer_tensors(qw), 128, 40)
    assert back.qtype == qw.qtype and back.block == qw.block
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("cfg", [HQQConfig(bits=4, group_size=32), HQQConfig(bits=3, group_size=16),
                                 HQQConfig(bits=2, group_size=-1, axis=0), HQQConfig(bits=4, compute_dtype="float16",
                                                                                   group_size=32)])
def test_save_load_identical_logits(tmp_path, cfg):
    model = tiny_llama()
    q = polyquant.quantize(model, cfg, show_progress=False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = q(ids).logits
    path = polyquant.save(q, tmp_path / "m")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "hqq" and qcfg["skip_modules"] == ["lm_head"]
    qc = qcfg["quant_config"]
    if cfg.axis == 0:  # whole-column groups: group_size = out_features differs by layer type -> keyed by tag
        assert qc["self_attn.k_proj"]["weight_quant_params"]["group_size"] == 32
        qc = qc["mlp.down_proj"]
    wqp = qc["weight_quant_params"]
    assert wqp["nbits"] == cfg.bits and wqp["axis"] == cfg.axis and wqp["channel_wise"] is True
    assert qc["scale_quant_params"] is None and qc["offload_meta"] is False
    q2, _ = polyquant.load(path)
    with torch.no_grad():
        out = q2(ids).logits
    assert torch.equal(out, ref)
    assert q2.polyquant.method == "hqq"
    info = polyquant.checkpoint_info(path)
    assert info["format"] == "hqq" and info["bits"] == cfg.bits and info["quantized_layers"] == 14


def test_quant_config_per_layer_type_when_layers_differ(tmp_path):
    model = tiny_llama(hidden=64)
    q = polyquant.quantize(model, HQQConfig(bits=4, group_size=-1), show_progress=False)
    # one group per row: group_size = in_features, 64 for most layers and 128 for down_proj
    qcfg = get_format("hqq").quantization_config(q, {n: m for n, m in q.named_modules()
                                                     if isinstance(m, polyquant.QuantLinear)})
    qc = qcfg["quant_config"]
    assert set(qc) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert qc["self_attn.q_proj"]["weight_quant_params"]["group_size"] == 64
    assert qc["mlp.down_proj"]["weight_quant_params"]["group_size"] == 128
    # a group of 128 flattened values spans two rows of a 64-wide weight: one config for all layers
    q = polyquant.quantize(model, HQQConfig(bits=4, group_size=128), show_progress=False)
    assert q.model.layers[0].self_attn.q_proj.quantized_weight.block == (2, 64)
    qcfg = get_format("hqq").quantization_config(q, {n: m for n, m in q.named_modules()
                                                     if isinstance(m, polyquant.QuantLinear)})
    assert qcfg["quant_config"]["weight_quant_params"]["group_size"] == 128
    assert linear_tag("model.layers.11.self_attn.q_proj") == "self_attn.q_proj"


def test_refusals():
    fmt = get_format("hqq")
    sym = rtn_quantize(torch.randn(16, 64), RTNConfig(bits=4, group_size=32, sym=True))
    assert "unsigned" in fmt.check_layer("l", sym, None)
    odd = hqq_quantize(torch.randn(3, 64), HQQConfig(bits=4, group_size=64))  # 3 groups: 4bit_u8 needs pairs
    assert "4bit_u8 packs 2" in fmt.check_layer("l", odd, None)
    good = hqq_quantize(torch.randn(16, 64), HQQConfig(bits=4, group_size=32))
    t = hqq_layer_tensors(good)
    bad = dict(t, group_size=torch.tensor(8, dtype=torch.int32), axis=torch.tensor(0, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="axis-0 groups of 8"):
        hqq_weight_from_tensors("l", bad, 64, 16)
    with pytest.raises(CheckpointError, match="quantized scale"):
        hqq_weight_from_tensors("l", dict(t, quant_scale=torch.tensor(1, dtype=torch.uint8)), 64, 16)
    with pytest.raises(CheckpointError, match="1.58"):
        hqq_weight_from_tensors("l", dict(t, nbits=torch.tensor(1.58)), 64, 16)
    with pytest.raises(CheckpointError, match="W_q"):
        hqq_weight_from_tensors("l", dict(t, W_q=t["W_q"][:-1]), 64, 16)
    with pytest.raises(CheckpointError, match="shape"):
        hqq_weight_from_tensors("l", t, 64, 32)
    with pytest.raises(CheckpointError, match="packing"):
        hqq_weight_from_tensors("l", dict(t, packing=torch.tensor([ord(c) for c in "2bit_u8"], dtype=torch.uint8)),
                                64, 16)
    with pytest.raises(CheckpointError, match="missing tensor 'zero'"):
        hqq_weight_from_tensors("l", {k: v for k, v in t.items() if k != "zero"}, 64, 16)


# -- against the hqq library ---------------------------------------------------------------------

@pytest.mark.parametrize("bits,gs,axis", [(4, 64, 1), (3, 32, 1), (2, 16, 1), (1, 64, 1), (8, 64, 1), (4, None, 0),
                                          (4, 256, 1)])
def test_interoperates_with_hqqlinear(bits, gs, axis):
    hq = pytest.importorskip("hqq.core.quantize", reason="the hqq library is not installed")
    torch.manual_seed(bits)
    lin = torch.nn.Linear(128, 64)
    cfg = hq.BaseQuantizeConfig(nbits=bits, group_size=gs, axis=axis)
    layer = hq.HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
    sd = layer.state_dict()
    assert set(sd) == HQQ_KEYS | {"bias"}
    # hqq -> polyquant: identical dequantized weight
    qw = hqq_weight_from_tensors("l", dict(sd), 128, 64)
    assert torch.equal(qw.dequantize(), layer.dequantize())
    # polyquant -> hqq: HQQLinear loads our tensors and computes our weights
    ours = hqq_quantize(lin.weight.data, HQQConfig(bits=bits, group_size=gs or -1, axis=axis))
    t = dict(hqq_layer_tensors(ours), bias=lin.bias.data.clone())
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    back = hq.HQQLinear(None, cfg, compute_dtype=torch.float32, device="cpu", initialize=False)
    back.load_state_dict(t)
    assert torch.equal(back.dequantize(), ours.dequantize())
