"""GPTQ format: bit-exact packing against the specification, checkpoints written by an
independent packer (numpy, per the AutoGPTQ definition), save -> load round trips, refusals."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import AUTO_INT4, AUTO_INT4_ACTORDER, sqnr_db, tiny_llama
from polyquant.formats import CheckpointError, get_format
from polyquant.formats.gptq import (gptq_layer_tensors, gptq_scale, gptq_weight_from_tensors,
                                    normalize_gptq_config, read_gptq_config)
from polyquant.methods.rtn import RTNConfig, rtn_quantize
from polyquant.nn import QuantLinear
from polyquant.nn.quantize import QuantRecord, replace_module, set_kernels
from polyquant.tensor.quantized_weight import QuantizedWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _i32(u: int) -> int:
    """An unsigned 32-bit pattern as the int32 value torch/safetensors store."""
    u &= 0xFFFFFFFF
    return u - (1 << 32) if u >= 1 << 31 else u


# -- an independent GPTQ packer (numpy + Python ints, written from the format description) ----

def np_pack_k(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``q [K, N]`` (ints) along K into int32 ``[K*bits/32, N]``, AutoGPTQ's ``pack`` order."""
    K, N = q.shape
    q = q.astype(np.uint64)
    if bits in (2, 4, 8):
        per = 32 // bits
        out = np.zeros((K // per, N), dtype=np.uint64)
        for j in range(per):
            out |= q[j::per] << np.uint64(bits * j)
    else:  # 3 bits: 3 words per 32 values, fields straddling word boundaries
        assert bits == 3 and K % 32 == 0
        out = np.zeros((K // 32 * 3, N), dtype=np.uint64)
        for b in range(K // 32):
            v = q[32 * b: 32 * b + 32]
            u = np.uint64
            w0 = sum(v[i] << u(3 * i) for i in range(10)) | ((v[10] & u(3)) << u(30))
            w1 = ((v[10] >> u(2)) & u(1)) | sum(v[i] << u(3 * (i - 11) + 1) for i in range(11, 21)) \
                | ((v[21] & u(1)) << u(31))
            w2 = ((v[21] >> u(1)) & u(3)) | sum(v[i] << u(3 * (i - 22) + 2) for i in range(22, 32))
            out[3 * b], out[3 * b + 1], out[3 * b + 2] = w0, w1, w2
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def np_pack_n(z: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``z [G, N]`` along N (qzeros)."""
    return np.ascontiguousarray(np_pack_k(np.ascontiguousarray(z.T), bits).T)


def write_gptq_checkpoint(path, model, bits: int, group_size: int, v1: bool, act_order: bool, sym: bool = False,
                          seed: int = 0):
    """A GPTQ checkpoint of ``model`` with random codes/zeros/scales, written without polyquant.
    Returns ``{layer: dense float32 weight by the format's formula}``."""
    rng = np.random.default_rng(seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    expected = {}
    for name, lin in model.named_modules():
        if not name.endswith(LINEARS):
            continue
        N, K = lin.weight.shape
        gs = K if group_size == -1 else group_size
        G = -(-K // gs)
        q = rng.integers(0, 2 ** bits, size=(K, N))
        z = rng.integers(1, 2 ** bits, size=(G, N))  # >= 1: representable in v1
        if sym:
            z = np.full((G, N), 2 ** (bits - 1))
        s = (rng.random((G, N)) * 0.02 + 0.001).astype(np.float16)
        if act_order:
            g_idx = np.empty(K, dtype=np.int64)
            g_idx[rng.permutation(K)] = np.arange(K) // gs
        else:
            g_idx = np.arange(K) // gs
        del sd[name + ".weight"]
        sd[name + ".qweight"] = torch.from_numpy(np_pack_k(q, bits))
        sd[name + ".qzeros"] = torch.from_numpy(np_pack_n(z - 1 if v1 else z, bits))
        sd[name + ".scales"] = torch.from_numpy(s)
        sd[name + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        w = (q - z[g_idx]) * s[g_idx].astype(np.float32)  # [K, N]: W[n, k] = (q[k,n] - z[g[k],n]) s[g[k],n]
        expected[name] = torch.from_numpy(w.T.astype(np.float32))
    sd.pop("lm_head.weight", None)  # tied
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
            "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2", "damp_percent": 0.01,
            "true_sequential": True, "static_groups": False}
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "quantize_config.json").write_text(json.dumps(qcfg))
    return expected


# -- a minimal per-layer harness (the same contract as polyquant.formats.api) ----------------

def _layer_load(fmt_name, folder, model):
    """Replace ``model``'s Linears by the checkpoint's layers via the format's per-layer API."""
    fmt = get_format(fmt_name)
    qcfg = read_gptq_config(folder)
    sd = load_file(str(folder / "model.safetensors"))
    for name in fmt.quantized_layers(qcfg, model, set(sd)):
        tensors = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        replace_module(model, name, fmt.load_layer(name, qcfg, tensors, model.get_submodule(name)))
    return model


def _layer_save(fmt_name, model, folder):
    fmt = get_format(fmt_name)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for n, m in layers.items():
        assert fmt.check_layer(n, m.quantized_weight, m) is None
    sd = {}
    for n, m in layers.items():
        sd.update({f"{n}.{k}": v for k, v in fmt.layer_tensors(n, m).items()})
        if m.bias is not None:
            sd[f"{n}.bias"] = m.bias.detach().half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    qcfg = fmt.quantization_config(model, layers)
    (folder / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    for fname, obj in fmt.extra_files(model, layers).items():
        (folder / fname).write_text(json.dumps(obj))
    return qcfg


def _api():
    try:
        from polyquant.formats import api
    except ImportError:
        return None
    return api if hasattr(api, "save") and hasattr(api, "load") else None


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# -- packing: hand-checked words ----------------------------------------------------------

def test_qweight_qzeros_4bit_hand_checked_v1_and_v2():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15], [0, 15, 0, 15, 8, 8, 8, 8]] * 4, dtype=torch.uint8)  # [8, 8]
    scale = torch.full((8, 1), 0.5)
    qw = QuantizedWeight.from_codes(codes, "int4", (1, 8), scale)  # sym: zero 8 everywhere
    t1 = gptq_layer_tensors(qw, "gptq")
    assert t1["qweight"].shape == (1, 8) and t1["qweight"].dtype == torch.int32
    assert t1["qweight"][0, 0].item() == _i32(0xF7654321)
    assert t1["qweight"][0, 1].item() == _i32(0x8888F0F0)
    assert t1["qzeros"].tolist() == [[_i32(0x77777777)]]  # v1: 8 - 1 in every nibble
    assert t1["scales"].dtype == torch.float16 and t1["scales"].shape == (1, 8)
    assert t1["g_idx"].tolist() == [0] * 8 and t1["g_idx"].dtype == torch.int32
    t2 = gptq_layer_tensors(qw, "gptq_v2")
    assert torch.equal(t2["qweight"], t1["qweight"])
    assert t2["qzeros"].tolist() == [[_i32(0x88888888)]]
    # asymmetric zeros 1..8 per output column: nibble j holds z[j] (-1 for v1)
    zero = torch.arange(1, 9, dtype=torch.float32).reshape(8, 1)
    qa = QuantizedWeight.from_codes(codes, "uint4", (1, 8), scale, zero)
    assert gptq_layer_tensors(qa, "gptq")["qzeros"].tolist() == [[_i32(0x76543210)]]
    assert gptq_layer_tensors(qa, "gptq_v2")["qzeros"].tolist() == [[_i32(0x87654321)]]


def test_3bit_packing_matches_the_three_word_layout():
    torch.manual_seed(1)
    codes = torch.randint(0, 8, (32, 64), dtype=torch.uint8)  # [out=32, in=64]
    zero = torch.randint(1, 8, (32, 2)).float()
    qw = QuantizedWeight.from_codes(codes, "uint3", (1, 32), torch.rand(32, 2) + 0.1, zero)
    t = gptq_layer_tensors(qw, "gptq")
    assert t["qweight"].shape == (6, 32) and t["qzeros"].shape == (2, 3)
    # word layout of the first output column, from the description (Python ints)
    v = [int(c) for c in codes[0, :32]]
    w0 = sum(v[i] << (3 * i) for i in range(10)) | (v[10] & 3) << 30
    w1 = (v[10] >> 2) | sum(v[i] << (3 * (i - 11) + 1) for i in range(11, 21)) | (v[21] & 1) << 31
    w2 = (v[21] >> 1) | sum(v[i] << (3 * (i - 22) + 2) for i in range(22, 32))
    assert t["qweight"][:3, 0].tolist() == [_i32(w0), _i32(w1), _i32(w2)]
    assert torch.equal(t["qweight"], torch.from_numpy(np_pack_k(codes.T.numpy().astype(np.int64), 3)))
    assert torch.equal(t["qzeros"], torch.from_numpy(np_pack_n(zero.T.numpy().astype(np.int64) - 1, 3)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_layer_roundtrip_exact(bits, fmt, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 96)
    qw = rtn_quantize(w, RTNConfig(bits=bits, group_size=32, sym=sym))
    qw.scale = gptq_scale(qw.scale)
    t = gptq_layer_tensors(qw, fmt)
    cfg = normalize_gptq_config({"quant_method": "gptq", "bits": bits, "group_size": 32, "sym": sym,
                                 "checkpoint_format": fmt})
    back = gptq_weight_from_tensors("l", cfg, t, 96, 64)
    assert back.qtype == qw.qtype and back.g_idx is None
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(), qw.dequantize())


# -- checkpoints written by the independent packer ------------------------------------------

@pytest.mark.parametrize("bits,v1,act_order,sym", [(4, True, True, False), (3, True, True, False),
                                                   (4, False, False, False), (2, False, True, False),
                                                   (4, True, True, True)])
def test_independent_checkpoint_loads_exactly(tmp_path, bits, v1, act_order, sym):
    model = tiny_llama()
    expected = write_gptq_checkpoint(tmp_path / "ckpt", model, bits, 32, v1, act_order, sym)
    loaded = _layer_load("gptq", tmp_path / "ckpt", tiny_llama())
    for name, w in expected.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinear)
        qw = m.quantized_weight
        assert torch.equal(qw.dequantize(), w), name
        assert (qw.g_idx is not None) == act_order
        assert qw.qtype == (f"int{bits}" if sym else f"uint{bits}") and (qw.zero is None) == sym
    api = _api()
    if api is not None:  # the generic loader reads the same checkpoint to the same weights
        m2, _ = api.load(tmp_path / "ckpt")  # kernel auto
        for name, w in expected.items():
            assert torch.equal(m2.get_submodule(name).quantized_weight.dequantize(), w), name
        if bits == 4:  # the fast CPU kernels take the loaded layers (act-order through the sorted path)
            kernels = {m.kernel_name for m in m2.modules() if isinstance(m, QuantLinear)}
            assert kernels == {AUTO_INT4_ACTORDER if act_order else AUTO_INT4}
            ids = torch.randint(0, 256, (1, 8))
            fast = _logits(m2, ids)
            set_kernels(m2, "reference")
            assert sqnr_db(_logits(m2, ids), fast) > 30


def test_sym_checkpoint_maps_to_signed_and_trivial_gidx_is_dropped():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    t = {"qweight": torch.from_numpy(np_pack_k(codes.T.numpy().astype(np.int64), 4)),
         "qzeros": torch.from_numpy(np_pack_n(np.full((2, 32), 7), 4)),
         "scales": torch.rand(2, 32).half(), "g_idx": (torch.arange(64) // 32).int()}
    cfg = normalize_gptq_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True})
    qw = gptq_weight_from_tensors("l", cfg, t, 64, 32)
    assert qw.qtype == "int4" and qw.zero is None and qw.g_idx is None
    ref = (codes.float() - 8) * t["scales"].float().T.repeat_interleave(32, dim=1)
    assert torch.equal(qw.dequantize(), ref)


# -- save -> load ---------------------------------------------------------------------------

def _rtn_model(bits=4, group_size=32, sym=True):
    from polyquant.methods.apply import quantize_model
    q = quantize_model(tiny_llama(), RTNConfig(bits=bits, group_size=group_size, sym=sym), show_progress=False)
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.qw_scale = gptq_scale(m.qw_scale)
    set_kernels(q, "reference")
    return q


@pytest.mark.parametrize("fmt,group_size", [("gptq", 32), ("gptq_v2", 32), ("gptq", -1), ("gptq", 48)])
def test_save_load_identical_logits(tmp_path, fmt, group_size):
    q = _rtn_model(group_size=group_size)  # 48: in=64/128 leave a short last group
    ids = torch.randint(0, 256, (2, 12))
    ref = _logits(q, ids)
    qcfg = _layer_save(fmt, q, tmp_path / "ck")
    assert qcfg["bits"] == 4 and qcfg["group_size"] == group_size and qcfg["sym"] is True
    assert qcfg["desc_act"] is False
    assert qcfg["checkpoint_format"] == fmt == qcfg["format"] and qcfg["pack_dtype"] == "int32"
    assert qcfg["meta"]["quantizer"][0].startswith("polyquant") and qcfg["lm_head"] is False
    assert json.loads((tmp_path / "ck" / "quantize_config.json").read_text()) == qcfg
    back = _layer_load("gptq", tmp_path / "ck", tiny_llama())
    set_kernels(back, "reference")
    assert torch.equal(_logits(back, ids), ref)


def test_save_load_through_api(tmp_path):
    api = _api()
    if api is None:
        pytest.skip("polyquant.formats.api not available yet")
    q = _rtn_model()
    ids = torch.randint(0, 256, (1, 10))
    ref = _logits(q, ids)
    api.save(q, tmp_path / "ck", format="gptq")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert (tmp_path / "ck" / "quantize_config.json").is_file()
    back, _ = api.load(tmp_path / "ck", kernel="reference")
    assert torch.equal(_logits(back, ids), ref)


def test_act_order_roundtrip(tmp_path):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    for name, lin in list(model.named_modules()):
        if not name.endswith(LINEARS):
            continue
        N, K = lin.weight.shape
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[torch.randperm(K, generator=g)] = (torch.arange(K) // 32).int()
        scale = gptq_scale(torch.rand(N, K // 32, generator=g) * 0.02)
        qw = QuantizedWeight.from_codes(codes, "int4", (1, 32), scale, g_idx=g_idx)
        replace_module(model, name, QuantLinear(qw, kernel="reference"))
    ids = torch.randint(0, 256, (1, 9))
    ref = _logits(model, ids)
    qcfg = _layer_save("gptq", model, tmp_path / "ck")
    assert qcfg["desc_act"] is True and qcfg["sym"] is True
    back = _layer_load("gptq", tmp_path / "ck", tiny_llama())
    set_kernels(back, "reference")
    assert torch.equal(_logits(back, ids), ref)
    n0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(back.get_submodule(n0).quantized_weight.g_idx.int(), model.get_submodule(n0).qw_g_idx)


def test_fp32_scales_round_with_a_warning(tmp_path):
    q = _rtn_model()
    m = q.get_submodule("model.layers.0.mlp.up_proj")
    m.qw_scale = m.qw_scale * (1 + 1e-6)  # no longer fp16-exact
    layers = {n: x for n, x in q.named_modules() if isinstance(x, QuantLinear)}
    with pytest.warns(UserWarning, match="fp16"):
        get_format("gptq").quantization_config(q, layers)


# -- refusals -------------------------------------------------------------------------------

def test_v1_refuses_zero_of_zero_v2_stores_it():
    w = torch.rand(32, 64)  # all >= 0: asymmetric zero point 0
    qw = rtn_quantize(w, RTNConfig(bits=4, group_size=32, sym=False))
    assert float(qw.zero.min()) == 0
    reason = get_format("gptq").check_layer("l", qw, None)
    assert reason and "gptq_v2" in reason and "compressed-tensors" in reason
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_layer_tensors(qw, "gptq")
    assert get_format("gptq_v2").check_layer("l", qw, None) is None
    t = gptq_layer_tensors(qw, "gptq_v2")
    cfg = normalize_gptq_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                 "checkpoint_format": "gptq_v2"})
    stored = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, gptq_scale(qw.scale), qw.zero)
    assert torch.equal(gptq_weight_from_tensors("l", cfg, t, 64, 32).dequantize(), stored.dequantize())


def test_check_layer_refuses_unstorable_layouts():
    fmt = get_format("gptq")
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    nf4 = QuantizedWeight.from_codes(codes, "nf4", (1, 32), torch.rand(32, 2))
    assert "integer" in fmt.check_layer("l", nf4, None)
    blk = QuantizedWeight.from_codes(codes, "int4", (16, 32), torch.rand(2, 2))
    assert "row blocks" in fmt.check_layer("l", blk, None)
    codes3 = torch.randint(0, 8, (32, 48), dtype=torch.uint8)
    odd = QuantizedWeight.from_codes(codes3, "int3", (1, 48), torch.rand(32, 1))
    assert "divide by 32" in fmt.check_layer("l", odd, None)
    big = QuantizedWeight.from_codes(codes, "int4", (1, 32), torch.full((32, 2), 1e6))
    assert "fp16" in fmt.check_layer("l", big, None)


def _good_tensors():
    codes = torch.randint(0, 16, (64, 32), dtype=torch.uint8)  # [in, out]
    return {"qweight": torch.from_numpy(np_pack_k(codes.numpy().astype(np.int64), 4)),
            "qzeros": torch.from_numpy(np_pack_n(np.full((2, 32), 7), 4)),
            "scales": torch.rand(2, 32).half(), "g_idx": (torch.arange(64) // 32).int()}


@pytest.mark.parametrize("change,match", [
    (lambda c, t: c.update(bits=3), "qweight has shape"),
    (lambda c, t: c.update(group_size=16), "qzeros has shape"),
    (lambda c, t: t.update(qweight=t["qweight"].float()), "qweight has dtype"),
    (lambda c, t: t.update(scales=t["scales"][:1]), "scales has shape"),
    (lambda c, t: t.update(g_idx=torch.full((64,), 5, dtype=torch.int32)), "g_idx values"),
    (lambda c, t: t.pop("qzeros"), "missing tensor 'qzeros'"),
])
def test_config_tensor_disagreement_raises_checkpoint_error(change, match):
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
    t = _good_tensors()
    change(cfg, t)
    with pytest.raises(CheckpointError, match=match) as e:
        gptq_weight_from_tensors("model.layers.0.mlp.up_proj", normalize_gptq_config(cfg), t, 64, 32)
    assert "model.layers.0.mlp.up_proj" in str(e.value)


def test_config_aliases_marlin_and_missing_sym(tmp_path):
    with pytest.warns(UserWarning, match="sym"):
        c = normalize_gptq_config({"w_bit": 4, "q_group_size": 64, "quant_method": "gptq"})
    assert (c["bits"], c["group_size"], c["sym"], c["checkpoint_format"]) == (4, 64, True, "gptq")
    assert normalize_gptq_config({"bits": 4, "sym": True, "format": "gptq_v2"})["checkpoint_format"] == "gptq_v2"
    for marlin in ({"bits": 4, "sym": True, "checkpoint_format": "marlin"},
                   {"bits": 4, "sym": True, "is_marlin_format": True},
                   {"bits": 4, "sym": True, "quant_method": "marlin"}):
        with pytest.raises(CheckpointError, match="marlin"):
            normalize_gptq_config(marlin)
    with pytest.raises(CheckpointError, match="bits"):
        normalize_gptq_config({"bits": 5, "sym": True})
    # lookup order: quantize_config.json, quant_config.json, then config.json
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"bits": 8, "sym": True}}))
    assert read_gptq_config(tmp_path)["bits"] == 8
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 2, "sym": True}))
    assert read_gptq_config(tmp_path)["bits"] == 2
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 3, "sym": True}))
    assert read_gptq_config(tmp_path)["bits"] == 3
    fmt = get_format("gptq")
    assert fmt.detect({"quant_method": "gptq"}) and not get_format("gptq_v2").detect({"quant_method": "gptq"})
    with pytest.raises(CheckpointError, match="marlin"):
        fmt.quantized_layers({"quant_method": "marlin", "bits": 4, "sym": True}, tiny_llama(), set())


def test_v1_overflowed_zero_reads_modulo_with_warning():
    t = _good_tensors()
    t["qzeros"] = torch.from_numpy(np_pack_n(np.full((2, 32), 15), 4))  # v1 field 15 -> zero 16 -> 0
    cfg = normalize_gptq_config({"bits": 4, "group_size": 32, "sym": False})
    with pytest.warns(UserWarning, match="overflowed"):
        qw = gptq_weight_from_tensors("l", cfg, t, 64, 32)
    assert qw.zero is not None and float(qw.zero.abs().max()) == 0


def test_mixed_bit_widths_are_refused():
    q = _rtn_model()
    m = q.get_submodule("model.layers.1.mlp.down_proj")
    qw8 = rtn_quantize(torch.randn(m.out_features, m.in_features), RTNConfig(bits=8, group_size=32))
    replace_module(q, "model.layers.1.mlp.down_proj", QuantLinear(qw8, kernel="reference"))
    layers = {n: x for n, x in q.named_modules() if isinstance(x, QuantLinear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="one bit width"):
            get_format("gptq").quantization_config(q, layers)
    assert isinstance(q.polyquant, QuantRecord)
