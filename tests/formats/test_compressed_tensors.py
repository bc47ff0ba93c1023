"""compressed-tensors: exact round trips, the library's own decompression of our checkpoints,
checkpoints written by the library, the on-disk layout, and transformers loading them."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import polyquant
from helpers import tiny_llama, tiny_qwen2, qweights
from polyquant.formats import CheckpointError, get_format, load, save
from polyquant.formats.compressed_tensors import CTActivationQuant
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import replace_module
from polyquant.tensor.quantized_weight import QuantizedWeight

ct = pytest.importorskip("compressed_tensors")

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

CASES = {
    "w4g32sym": dict(bits=4, group_size=32, sym=True),
    "w4g32asym": dict(bits=4, group_size=32, sym=False),
    "w8pc": dict(bits=8, group_size=-1, sym=True),
    "w3g32": dict(bits=3, group_size=32, sym=True),
    "w8pc-asym": dict(bits=8, group_size=-1, sym=False),
    "w2g16-asym": dict(bits=2, group_size=16, sym=False),
    "w5pc-asym": dict(bits=5, group_size=-1, sym=False),  # odd width: zero points straddle words
}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


_CACHE: dict = {}


def _quant(model, **kw):
    return polyquant.quantize(model, polyquant.RTNConfig(**kw), show_progress=False)


def _cached(model, **kw):
    """A shared quantized model for tests that only read it (quantizing odd bit widths is slow)."""
    key = (id(model), tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = _quant(model, **kw)
    return _CACHE[key]


def _ct_compressor(group: dict):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    return BaseCompressor.get_value_from_registry(group["format"]), QuantizationScheme.model_validate(group)


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c != "w5pc-asym"])
def test_round_trip_bit_identical(llama, tmp_path, case):
    q = _cached(llama, **CASES[case])
    y = q(X).logits
    path = save(q, tmp_path / "ckpt")
    q2, tok = load(path)
    assert tok is None
    assert torch.equal(q2(X).logits, y)
    a, b = qweights(q), qweights(q2)
    assert sorted(a) == sorted(b) and len(a) == 14
    for n in a:
        assert a[n].qtype == b[n].qtype and a[n].block == b[n].block
        assert torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scale, b[n].scale)
        assert (a[n].zero is None) == (b[n].zero is None)
        if a[n].zero is not None:
            assert torch.equal(a[n].zero, b[n].zero)
        assert q.get_submodule(n).kernel_name == q2.get_submodule(n).kernel_name
    rec = q2.polyquant
    assert (rec.method, rec.format, rec.config["bits"]) == ("rtn", "compressed-tensors", CASES[case]["bits"])


def test_round_trip_with_bias_qwen2(tmp_path):
    q = _quant(tiny_qwen2(), bits=4, group_size=32, sym=False)
    path = save(q, tmp_path / "qwen")
    sd = load_file(path / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    q2, _ = load(path)
    assert torch.equal(q2(X).logits, q(X).logits)


# -- the library reads our checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("case", ["w4g32sym", "w4g32asym", "w8pc", "w3g32", "w2g16-asym", "w5pc-asym"])
def test_library_decompresses_ours_exactly(llama, tmp_path, case):
    q = _cached(llama, **CASES[case])
    path = save(q, tmp_path / "ckpt")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    comp, scheme = _ct_compressor(group)
    sd = load_file(path / "model.safetensors")
    for name, qw in qweights(q).items():
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        w = comp.decompress(local, scheme)["weight"]
        assert w.dtype == torch.float32 and w.shape == qw.shape
        assert (w - qw.dequantize()).abs().max().item() == 0.0, name


# -- layout ---------------------------------------------------------------------------------------
def test_exact_keys_dtypes_shapes(llama, tmp_path):
    q = _cached(llama, bits=4, group_size=32, sym=False)
    path = save(q, tmp_path / "ckpt")
    sd = load_file(path / "model.safetensors")
    p = "model.layers.0.self_attn."
    assert {k[len(p + "q_proj."):] for k in sd if k.startswith(p + "q_proj.")} == {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    spec = {  # [out, in] = [64, 64], g32, 4-bit
        "q_proj.weight_packed": (torch.int32, (64, 8)), "q_proj.weight_scale": (torch.float32, (64, 2)),
        "q_proj.weight_zero_point": (torch.int32, (8, 2)), "q_proj.weight_shape": (torch.int64, (2,)),
        "k_proj.weight_packed": (torch.int32, (32, 8)), "k_proj.weight_zero_point": (torch.int32, (4, 2)),
    }
    for k, (dt, shape) in spec.items():
        assert (sd[p + k].dtype, tuple(sd[p + k].shape)) == (dt, shape), k
    assert sd[p + "q_proj.weight_shape"].tolist() == [64, 64]
    assert sd["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 16)
    assert "lm_head.weight" not in sd and sd["model.embed_tokens.weight"].shape == (256, 64)  # tied: stored once
    assert not any(k.endswith(".weight") and "layers" in k and "norm" not in k for k in sd)
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
        "dynamic": False, "actorder": None}
    assert "polyquant" not in qc and json.loads((path / "polyquant.json").read_text())["method"] == "rtn"
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(qc)  # the library accepts the config as written


def test_packing_hand_checked():
    """4-bit codes 0..7 -> 0x76543210; 3-bit value 7 at element 10 straddles words 0 and 1;
    zero points pack along dim 0 (offset binary); symmetric 8-bit codes pack 4 per word."""
    fmt = get_format("compressed-tensors")
    codes = torch.zeros(8, 32, dtype=torch.uint8)
    codes[:, :8] = torch.arange(8, dtype=torch.uint8)
    zero = torch.arange(8, dtype=torch.float32).reshape(8, 1)  # uint4 zero 0..7 per row
    qw = QuantizedWeight.from_codes(codes, "uint4", (1, 32), torch.ones(8, 1), zero)
    t = fmt.layer_tensors("x", QuantLinear(qw, kernel="reference"))
    assert t["weight_packed"][0].tolist() == [0x76543210, 0, 0, 0]
    assert t["weight_zero_point"].tolist() == [[0x76543210]]  # zp_signed + 8 == our zero
    c3 = torch.zeros(1, 32, dtype=torch.uint8)
    c3[0, 10] = 7  # bits 30, 31, 32
    qw3 = QuantizedWeight.from_codes(c3, "int3", (1, 32), torch.ones(1, 1))
    t3 = fmt.layer_tensors("y", QuantLinear(qw3, kernel="reference"))
    assert t3["weight_packed"].tolist() == [[-(1 << 31) + (1 << 30), 1, 0]]
    c8 = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8)
    qw8 = QuantizedWeight.from_codes(c8, "int8", (1, 4), torch.ones(1, 1))
    t8 = fmt.layer_tensors("z", QuantLinear(qw8, kernel="reference"))
    assert t8["weight_packed"].tolist() == [[int.from_bytes(bytes([0, 127, 128, 255]), "little", signed=True)]]
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    assert torch.equal(t8["weight_packed"], pack_to_int32((c8.to(torch.int16) - 128).to(torch.int8), 8))
    assert torch.equal(t3["weight_packed"], pack_to_int32((c3.to(torch.int16) - 4).to(torch.int8), 3))


def test_refusals_name_the_layer(llama, tmp_path):
    q = _quant(llama, bits=4, group_size=48, sym=True)  # 48 does not divide 64
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*group size 48 does not divide in_features 64"):
        save(q, tmp_path / "bad", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


# -- act-order, fp8, W8A8 ---------------------------------------------------------------------------
def _swap_all(model, make):
    """Replace every QuantLinear by ``make(name, qlinear)``."""
    for n, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            replace_module(model, n, make(n, m))
    return model


def test_act_order_g_idx_round_trip(llama, tmp_path, monkeypatch):
    q = _quant(llama, bits=4, group_size=32, sym=True)
    gen = torch.Generator().manual_seed(3)

    def with_gidx(n, m):
        qw = m.quantized_weight
        g_idx = torch.randperm(qw.shape[1], generator=gen).to(torch.int32) // 32
        qw2 = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, g_idx)
        return QuantLinear(qw2, kernel="reference", method="rtn")
    q = _swap_all(q, with_gidx)
    y = q(X).logits
    with pytest.raises(ValueError, match="POLYQUANT_CT_ACTORDER_GROUP=1"):  # refused unless asked for
        save(q, tmp_path / "refused")
    monkeypatch.setenv("POLYQUANT_CT_ACTORDER_GROUP", "1")
    with pytest.warns(UserWarning, match="actorder='group'"):
        path = save(q, tmp_path / "ao")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    sd = load_file(path / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight_g_idx"].dtype == torch.int32
    q2, _ = load(path, kernel="reference")
    assert torch.equal(q2(X).logits, y)
    for n, qw in qweights(q).items():
        assert torch.equal(qweights(q2)[n].g_idx, qw.g_idx)


def test_trivial_g_idx_is_dropped(llama, tmp_path):
    q = _quant(llama, bits=4, group_size=32, sym=True)

    def trivial(n, m):
        qw = m.quantized_weight
        g = (torch.arange(qw.shape[1]) // 32).to(torch.int32)
        qw2 = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, None, g)
        return QuantLinear(qw2, kernel="reference")
    q = _swap_all(q, trivial)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save(q, tmp_path / "t")
    assert not any(k.endswith("weight_g_idx") for k in load_file(path / "model.safetensors"))
    q2, _ = load(path, kernel="reference")
    assert torch.equal(q2(X).logits, q(X).logits)


def test_fp8_and_w8a8(llama, tmp_path):
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

    def fp8(n, m):
        w = m.quantized_weight.dequantize()
        s = w.abs().amax(1, keepdim=True) / 448.0
        qw = QuantizedWeight.from_codes((w / s).to(torch.float8_e4m3fn), "float8_e4m3fn", (1, w.shape[1]), s)
        return QuantLinear(qw, kernel="reference")

    def w8a8(n, m):
        return QuantLinear(m.quantized_weight, kernel="reference", act_quant=CTActivationQuant(act))

    static = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    scales = {}

    def w8a8_static(n, m):  # a different calibrated input scale per layer
        scales[n] = torch.tensor([0.01 * (1 + len(scales))])
        return QuantLinear(m.quantized_weight, kernel="reference", act_quant=CTActivationQuant(static, scales[n]))
    for name, make, fmt_name in (("fp8", fp8, "naive-quantized"), ("w8a8", w8a8, "int-quantized"),
                                 ("w8a8-static", w8a8_static, "int-quantized")):
        m = _swap_all(_quant(llama, bits=8, group_size=-1, sym=True), make)
        y = m(X).logits
        path = save(m, tmp_path / name)
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        assert qc["format"] == fmt_name
        m2, _ = load(path, kernel="reference")
        assert torch.equal(m2(X).logits, y), name
        group = qc["config_groups"]["group_0"]
        comp, scheme = _ct_compressor(group)
        sd = load_file(path / "model.safetensors")
        n = "model.layers.1.mlp.up_proj"
        local = {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".")}
        assert torch.equal(comp.decompress(local, scheme)["weight"], m.get_submodule(n).quantized_weight.dequantize())
    assert len(scales) == 14 and torch.equal(sd[f"{n}.input_scale"], scales[n])
    assert torch.equal(m2.get_submodule(n).act_quant.scale, scales[n])


# -- checkpoints written by the library ------------------------------------------------------------
def _library_checkpoint(path, dtype=torch.float32, inputs=None, **wargs):
    """Quantize a tiny llama with compressed-tensors itself (min/max qparams), compress and save."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    m = tiny_llama(seed=5).to(dtype)
    args = QuantizationArgs(**wargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args,
                                input_activations=QuantizationArgs(**inputs) if inputs else None)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(m, qc, show_progress=False)
    for _, mod in m.named_modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        w = mod.weight.data
        cols = args.group_size if args.strategy == "group" else w.shape[1]
        g = w.reshape(w.shape[0], -1, cols)
        s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
        mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(m)
    comp.compress_model(m)
    m.save_pretrained(str(path))
    comp.update_config(str(path))
    comp.decompress_model(m)  # the library's own dense weights, for comparison
    return m


LIB_CASES = {
    "w4a16-sym-g32": dict(num_bits=4, symmetric=True, strategy="group", group_size=32),
    "w4-asym-channel": dict(num_bits=4, symmetric=False, strategy="channel"),
    "w8a16-channel": dict(num_bits=8, symmetric=True, strategy="channel"),
    "w6-asym-g16": dict(num_bits=6, symmetric=False, strategy="group", group_size=16),
}


@pytest.mark.parametrize("case", list(LIB_CASES))
def test_library_written_checkpoint_loads(tmp_path, case):
    lib = _library_checkpoint(tmp_path / case, **LIB_CASES[case])
    assert polyquant.detect_format(tmp_path / case) == "compressed-tensors"
    q, _ = load(tmp_path / case, kernel="reference")
    assert q.polyquant.extra["written_by"].startswith("foreign (compressed-tensors")
    for n, qw in qweights(q).items():
        assert torch.equal(qw.dequantize(), lib.get_submodule(n).weight.data), n
    with torch.no_grad():
        assert torch.equal(q(X).logits, lib(X).logits)


def test_library_written_bf16_and_w8a8(tmp_path):
    lib = _library_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, num_bits=4, symmetric=False,
                              strategy="group", group_size=32)
    q, _ = load(tmp_path / "bf16", dtype=torch.bfloat16, kernel="reference")
    for n, qw in qweights(q).items():
        assert qw.scale.dtype == torch.bfloat16
        # exact: (q - zp) * s is exact in fp32 and rounds once to bf16, like the library's bf16 product
        assert torch.equal(qw.dequantize(torch.bfloat16), lib.get_submodule(n).weight.data), n
    act = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    lib = _library_checkpoint(tmp_path / "w8a8", inputs=act, num_bits=8, symmetric=True, strategy="channel")
    qc = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    q, _ = load(tmp_path / "w8a8", kernel="reference")
    assert isinstance(q.model.layers[0].mlp.up_proj.act_quant, CTActivationQuant)
    for n, qw in qweights(q).items():
        assert torch.equal(qw.dequantize(), lib.get_submodule(n).weight.data), n
    with torch.no_grad():
        ours, theirs = q(X).logits, lib(X).logits
    assert torch.equal(ours, theirs)  # same per-token int8 activation rounding as the library


def test_config_bits_disagree_with_tensors(llama, tmp_path):
    path = save(_cached(llama, bits=8, group_size=-1, sym=True), tmp_path / "w8")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.[a-z_.]+'.*weight_packed has 16 words.*need 8"):
        load(path)


# -- transformers ---------------------------------------------------------------------------------
def test_transformers_loads_our_symmetric_checkpoint(llama, tmp_path):
    from transformers import AutoModelForCausalLM
    q = _cached(llama, bits=4, group_size=32, sym=True)
    path = save(q, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    ours, _ = load(path, kernel="reference")
    with torch.no_grad():
        assert torch.equal(hf(X).logits, ours(X).logits)


def test_transformers_asymmetric_known_failure(llama, tmp_path):
    """transformers 5.24 + compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints,
    including ones the library writes itself (the packed zero point is reported as a size mismatch
    against the unpacked one on the meta model). Kept strict so a fix is noticed."""
    from transformers import AutoModelForCausalLM
    path = save(_cached(llama, bits=4, group_size=32, sym=False), tmp_path / "asym")
    try:
        AutoModelForCausalLM.from_pretrained(str(path))
    except RuntimeError as e:
        assert "mismatch" in str(e).lower() or "ignore_mismatched_sizes" in str(e)
        pytest.xfail("transformers 5.24 + compressed-tensors 0.20: asymmetric pack-quantized zero point mismatch")
    pytest.fail("transformers now loads asymmetric compressed-tensors checkpoints: turn this into a real test")


def _legacy_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Old compressed-tensors odd-width packing, written out plainly: 32 // bits values per word."""
    per = 32 // bits
    out, n = codes.shape
    words = torch.zeros(out, -(-n // per), dtype=torch.int64)
    for j in range(n):
        words[:, j // per] |= codes[:, j].to(torch.int64) << (bits * (j % per))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_legacy_odd_bit_packing_is_read(llama, tmp_path):
    q = _cached(llama, bits=3, group_size=32, sym=True)
    path = save(q, tmp_path / "old")
    sd = load_file(path / "model.safetensors")
    for name, qw in qweights(q).items():
        sd[f"{name}.weight_packed"] = _legacy_pack(qw.codes, 3)
    assert sd["model.layers.0.self_attn.q_proj.weight_packed"].shape == (64, 7)  # dense would be 6
    from safetensors.torch import save_file
    save_file(sd, str(path / "model.safetensors"))
    q2, _ = load(path)
    for name, qw in qweights(q).items():
        assert torch.equal(qweights(q2)[name].codes, qw.codes), name


def test_mixed_schemes_use_exact_targets(llama, tmp_path):
    from transformers import AutoModelForCausalLM
    q = _quant(llama, bits=4, group_size=32, sym=True)
    q8 = _cached(llama, bits=8, group_size=-1, sym=True)
    for n in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        replace_module(q, n, q8.get_submodule(n))
    path = save(q, tmp_path / "mixed")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert len(groups) == 2 and qc["format"] == "pack-quantized"
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and len(groups["group_0"]["targets"]) == 12
    q2, _ = load(path, kernel="reference")
    assert qweights(q2)["model.layers.1.self_attn.v_proj"].bits == 8
    assert qweights(q2)["model.layers.1.self_attn.q_proj"].bits == 4
    y = q2(X).logits
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        assert torch.equal(hf(X).logits, y)


@pytest.mark.slow
def test_default_model_round_trip_and_transformers(tmp_path):
    """SmolLM2-135M, W4 g64 sym: exact round trip; transformers reads it to the same logits as our
    reference kernel."""
    from transformers import AutoModelForCausalLM
    model, tok = polyquant.load_model("default")
    q = _quant(model, bits=4, group_size=64, sym=True)
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    path = save(q, tmp_path / "smol", tokenizer=tok)
    info = polyquant.checkpoint_info(path)
    assert info["quantized_layers"] == 210 and info["bytes_by_kind"]["codes"] == 53084160
    q2, tok2 = load(path)
    with torch.no_grad():
        assert torch.equal(q2(ids).logits, q(ids).logits)
        ref, _ = load(path, kernel="reference")
        hf = AutoModelForCausalLM.from_pretrained(str(path))
        assert torch.equal(hf(ids).logits, ref(ids).logits)
    assert tok2(["x = 1"])["input_ids"] == tok(["x = 1"])["input_ids"]


@pytest.mark.parametrize("args", [
    dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True),
    dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=16, dynamic=True),
    dict(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=True),
])
def test_activation_quant_matches_library(args):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    x = torch.randn(2, 5, 64) * 3
    a = QuantizationArgs(**args)
    s, z = compute_dynamic_scales_and_zp(x, a, module=None)
    ref = fake_quantize(x, s, None if a.symmetric else z, a)
    assert torch.equal(CTActivationQuant(args)(x), ref)
    assert not torch.equal(ref, x)


def test_fp8_block_layer_matches_library():
    """FP8 2-D blocks (rows not a multiple of the block): our layer tensors decompress in the
    library to exactly our dequantize(), and load back to the same weight."""
    from polyquant.tensor.affine import block_reduce
    from polyquant.tensor.quantized_weight import expand_blocks
    fmt = get_format("compressed-tensors")
    w, blk = torch.randn(40, 64), (16, 32)
    s = block_reduce(w, blk, "amax") / 448
    qw = QuantizedWeight.from_codes((w / expand_blocks(s, blk, w.shape)).to(torch.float8_e4m3fn),
                                    "float8_e4m3fn", blk, s)
    m = QuantLinear(qw, kernel="reference")
    holder = torch.nn.Module()
    holder.l = m
    qc = fmt.quantization_config(holder, {"l": m})
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["block_structure"] == [16, 32] and group["format"] == "naive-quantized"
    t = fmt.layer_tensors("l", m)
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (3, 2)
    comp, scheme = _ct_compressor(group)
    assert torch.equal(comp.decompress(dict(t), scheme)["weight"], qw.dequantize())
    back = fmt.load_layer("l", qc, dict(t), torch.nn.Linear(64, 40, bias=False, device="meta"))
    assert torch.equal(back.quantized_weight.dequantize(), qw.dequantize())
