"""quanto format: quanto's dim-0 packing on hand-checked examples, exact save -> load, the on-disk
layout (state-dict keys, quanto_qmap.json), refusals, and (with optimum-quanto) quanto reading our
checkpoints and polyquant reading quanto's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import polyquant
from helpers import tiny_llama
from polyquant.formats.quanto import pack_weights, unpack_weights
from polyquant.methods.quanto import QuantoConfig

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
CAL = [torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
CASES = {"int4": QuantoConfig(bits=4), "int2": QuantoConfig(bits=2), "int8": QuantoConfig(bits=8),
         "fp8": QuantoConfig(weights="qfloat8"), "int8-a8": QuantoConfig(bits=8, activations="qint8"),
         "int4-af8": QuantoConfig(bits=4, activations="qfloat8")}


def test_pack_hand_checked():
    # 3 rows at 4 bits: ceil(3/2) = 2 packed rows; rows 0-1 in the low nibble, row 2 in the high one
    codes = torch.tensor([[1, 4], [2, 5], [3, 6]], dtype=torch.uint8)
    packed = pack_weights(codes, 4)
    assert packed.tolist() == [[1 | 3 << 4, 4 | 6 << 4], [2, 5]]
    assert torch.equal(unpack_weights(packed, 4, 3), codes)
    # 2 bits: 5 rows -> 2 packed rows, chunk i in bits [2i, 2i+2)
    c2 = torch.tensor([[0], [1], [2], [3], [1]], dtype=torch.uint8)
    p2 = pack_weights(c2, 2)
    assert p2.tolist() == [[0 | 2 << 2 | 1 << 4], [1 | 3 << 2]]
    assert torch.equal(unpack_weights(p2, 2, 5), c2)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(hidden=128)  # down_proj has 256 inputs: quanto groups of 128


# int4 (QuantoConfig's default) is tests/test_conformance.py's quanto -> quanto case
@pytest.mark.parametrize("case", [c for c in CASES if c != "int4"])
def test_save_load_identical_logits(llama, case, tmp_path):
    q = polyquant.quantize(llama, CASES[case], calibration=CAL, show_progress=False)
    out = polyquant.save(q, tmp_path / "ck")
    q2, _ = polyquant.load(out)
    with torch.no_grad():
        assert torch.equal(q(X).logits, q2(X).logits)
    if CASES[case].activations != "none":
        a, b = q.model.layers[1].mlp.up_proj.act_quant, q2.model.layers[1].mlp.up_proj.act_quant
        assert torch.equal(a.input_scale, b.input_scale) and b.qtype == CASES[case].activations


def test_on_disk_layout(llama, tmp_path):
    q = polyquant.quantize(llama, QuantoConfig(bits=4), show_progress=False)
    out = polyquant.save(q, tmp_path / "ck")
    t = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj."
    assert t[p + "weight._data._data"].dtype == torch.uint8
    assert t[p + "weight._data._data"].shape == (128 * 256 // 128 // 2, 128)  # G = 256 groups of 128, 2 per byte
    assert t[p + "weight._scale"].shape == (256, 1) and t[p + "weight._shift"].shape == (256, 1)
    assert t[p + "input_scale"].shape == () and t[p + "input_scale"].item() == 1.0
    qp = "model.layers.0.self_attn.q_proj."  # in_features 128: one group per row
    assert t[qp + "weight._scale"].shape == (128, 1) and t[qp + "weight._data._data"].shape == (64, 128)
    qmap = json.loads((out / "quanto_qmap.json").read_text())
    assert len(qmap) == 14 and qmap[p[:-1]] == {"weights": "qint4", "activations": "none"}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "quanto", "weights": "int4", "activations": None,
                   "modules_to_not_convert": ["lm_head"]}
    qw = q.model.layers[0].mlp.down_proj.quantized_weight
    assert torch.equal(t[p + "weight._shift"].reshape(-1), (qw.zero * qw.scale.double()).float().reshape(-1))
    q8 = polyquant.quantize(llama, QuantoConfig(bits=8), show_progress=False)
    t8 = load_file(str(polyquant.save(q8, tmp_path / "c8") / "model.safetensors"))
    assert t8[p + "weight._data"].dtype == torch.int8 and t8[p + "weight._scale"].shape == (128, 1)
    assert p + "weight._shift" not in t8


def test_refusals(llama, tmp_path):
    g64 = polyquant.quantize(llama, QuantoConfig(bits=4, group_size=64), show_progress=False)
    with pytest.raises(ValueError, match="q_proj.*derives the group size.*128 -> one group per row"):
        polyquant.save(g64, tmp_path / "a")
    with pytest.warns(UserWarning):
        unc = polyquant.quantize(llama, QuantoConfig(bits=8, activations="qint8"), show_progress=False)
    with pytest.raises(ValueError, match="not calibrated"):
        polyquant.save(unc, tmp_path / "b")
    rtn = polyquant.quantize(llama, polyquant.RTNConfig(bits=8, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="symmetric per row"):
        polyquant.save(rtn, tmp_path / "c", format="quanto")


def test_other_methods_int4_layouts_are_stored(llama, tmp_path):
    """Any 4-bit affine layout with quanto's grouping maps to (scale, shift)."""
    r = polyquant.quantize(llama, polyquant.RTNConfig(bits=4, group_size=-1, sym=False,
                                                      exclude=["down_proj"]), show_progress=False)
    out = polyquant.save(r, tmp_path / "ck", format="quanto")
    r2, _ = polyquant.load(out)
    with torch.no_grad():
        assert torch.allclose(r(X).logits, r2(X).logits, atol=1e-5, rtol=0)


# -- with optimum-quanto --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["int4", "int2", "int8", "fp8"])
def test_quanto_loads_our_checkpoint(llama, case, tmp_path):
    q = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    ours = polyquant.quantize(llama, CASES[case], show_progress=False)
    polyquant.set_kernels(ours, "reference")
    out = polyquant.save(ours, tmp_path / "ck")
    theirs = q.QuantizedModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.allclose(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=0)


def test_polyquant_loads_quantos_checkpoint(tmp_path):
    q = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    m = tiny_llama(hidden=128)
    qm = q.QuantizedModelForCausalLM.quantize(m, weights=q.qint4, exclude="lm_head")
    qm.save_pretrained(str(tmp_path / "ck"))
    ours, _ = polyquant.load(tmp_path / "ck", kernel="reference")
    assert ours.polyquant.format == "quanto"
    with torch.no_grad():
        assert torch.allclose(ours(X).logits, qm(X).logits, atol=1e-5, rtol=0)
