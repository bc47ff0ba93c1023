"""compressed-tensors float8 schemes (FP8_DYNAMIC, FP8_BLOCK, weight-only, static FP8): exact round
trips (with and without polyquant's record), the library decompressing our checkpoints to the same
weights, the on-disk layout, and checkpoints the library itself writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import polyquant
from helpers import tiny_llama, qweights
from polyquant.formats import load, save
from polyquant.formats.compressed_tensors import CTActivationQuant
from polyquant.methods.fp8 import Fp8Config, fp8_preset

ct = pytest.importorskip("compressed_tensors")

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))

SCHEMES = {  # name -> (config, ct format, weight strategy, input_activations)
    "FP8_DYNAMIC": (fp8_preset("FP8_DYNAMIC"), "float-quantized", "channel",
                    {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}),
    "FP8_WEIGHT_ONLY": (fp8_preset("FP8_WEIGHT_ONLY"), "naive-quantized", "channel", None),
    "FP8_BLOCK_32": (Fp8Config(weights="block", block_size=[32, 32]), "float-quantized", "block",
                     {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "group",
                      "group_size": 32}),
    "FP8": (fp8_preset("FP8"), "float-quantized", "tensor",
            {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}),
}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


_CACHE: dict = {}


def _quantized(llama, name):
    if name not in _CACHE:
        cfg = SCHEMES[name][0]
        _CACHE[name] = polyquant.quantize(llama, cfg, calibration=CALIB if name == "FP8" else None,
                                          show_progress=False)
    return _CACHE[name]


# FP8_DYNAMIC with polyquant.json (Fp8Config's default) is tests/test_conformance.py's fp8 case
@pytest.mark.parametrize("record,name", [(r, n) for r in (True, False) for n in SCHEMES
                                         if (r, n) != (True, "FP8_DYNAMIC")])
def test_round_trip_identical_logits(llama, tmp_path, name, record):
    q = _quantized(llama, name)
    path = save(q, tmp_path / "ckpt")
    if not record:  # as any compressed-tensors reader sees it: the rule comes from input_activations
        (path / "polyquant.json").unlink()
    q2, _ = load(path)
    with torch.no_grad():
        assert torch.equal(q2(X).logits, q(X).logits)
    for n, qw in qweights(q).items():
        assert torch.equal(qweights(q2)[n].dequantize(), qw.dequantize())
    act = q2.model.layers[0].self_attn.q_proj.act_quant
    if SCHEMES[name][3] is None:
        assert act is None
    elif not record:
        assert isinstance(act, CTActivationQuant)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_config_and_layout(llama, tmp_path, name):
    cfg, fmt, strategy, inputs = SCHEMES[name]
    q = _quantized(llama, name)
    path = save(q, tmp_path / "ckpt")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(qc)  # the library accepts it
    assert qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    groups = list(qc["config_groups"].values())
    if strategy != "block":  # 32 x 32 blocks: a 32 x 64 layer is still 'block'; all layers one group
        assert len(groups) == 1
    g = groups[0]
    assert g["weights"]["type"] == "float" and g["weights"]["num_bits"] == 8 and g["weights"]["strategy"] == strategy
    assert g["input_activations"] == inputs
    sd = load_file(path / "model.safetensors")
    n = "model.layers.1.mlp.up_proj"  # [128, 64]
    keys = {k[len(n) + 1:] for k in sd if k.startswith(n + ".")}
    assert keys == ({"weight", "weight_scale", "input_scale"} if name == "FP8" else {"weight", "weight_scale"})
    assert sd[n + ".weight"].dtype == torch.float8_e4m3fn and sd[n + ".weight"].shape == (128, 64)
    shape = {"channel": (128, 1), "tensor": (1,), "block": (4, 2)}[strategy]
    assert sd[n + ".weight_scale"].dtype == torch.float32 and tuple(sd[n + ".weight_scale"].shape) == shape
    if name == "FP8":
        s = sd[n + ".input_scale"]
        assert s.dtype == torch.float32 and s.shape == (1,)
        assert s.item() == q.get_submodule(n).act_quant.scale.item()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_library_decompresses_ours_exactly(llama, tmp_path, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    q = _quantized(llama, name)
    path = save(q, tmp_path / "ckpt")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    sd = load_file(path / "model.safetensors")
    checked = 0
    for group in qc["config_groups"].values():
        comp = BaseCompressor.get_value_from_registry(group["format"])
        scheme = QuantizationScheme.model_validate(group)
        names = [n for n in qweights(q) if group["targets"] == ["Linear"] or n in group["targets"]]
        for n in names:
            local = {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".")}
            w = comp.decompress(local, scheme)["weight"]
            assert w.dtype == torch.float32 and torch.equal(w, q.get_submodule(n).quantized_weight.dequantize()), n
            checked += 1
    assert checked == 14


def test_activation_group_must_divide_in_features(llama, tmp_path):
    q = polyquant.quantize(llama, fp8_preset("FP8_BLOCK"), show_progress=False)  # groups of 128, in = 64
    with pytest.raises(ValueError, match=r"cannot store layer 'model\.layers\.0\.[a-z_.]+'.*activation group size "
                                         r"128 does not divide in_features 64"):
        save(q, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    wo = polyquant.quantize(llama, Fp8Config(weights="block", activations="none"), show_progress=False)
    q2, _ = load(save(wo, tmp_path / "wo"))  # weight-only 128 x 128 blocks (partial): stored fine
    with torch.no_grad():
        assert torch.equal(q2(X).logits, wo(X).logits)


# -- written by the library ------------------------------------------------------------------------------
def _library_fp8(path, preset: str, input_scale: float | None = None):
    """Quantize a tiny llama with compressed-tensors' own preset scheme (its min/max qparams), compress,
    save; returns the library's decompressed model (its own forward applies the activation rule)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    m = tiny_llama(seed=5)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(m, qc, show_progress=False)
    for _, mod in m.named_modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        w = mod.weight.data
        if scheme.weights.strategy == "tensor":
            s, _ = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), scheme.weights)
        else:
            s, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme.weights)
        mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
        if input_scale is not None:
            mod.input_scale.data.fill_(input_scale)
    comp = ModelCompressor.from_pretrained_model(m)
    comp.compress_model(m)
    m.save_pretrained(str(path))
    comp.update_config(str(path))
    comp.decompress_model(m)
    return m


@pytest.mark.parametrize("preset,input_scale", [("FP8_DYNAMIC", None), ("FP8", 0.02)])
def test_library_written_checkpoint_loads(tmp_path, preset, input_scale):
    lib = _library_fp8(tmp_path / preset, preset, input_scale)
    qc = json.loads((tmp_path / preset / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    q, _ = load(tmp_path / preset)
    assert q.polyquant.extra["written_by"].startswith("foreign (compressed-tensors")
    for n, qw in qweights(q).items():
        assert qw.qtype == "float8_e4m3fn" and torch.equal(qw.dequantize(), lib.get_submodule(n).weight.data), n
    act = q.model.layers[0].mlp.up_proj.act_quant
    assert isinstance(act, CTActivationQuant) and (act.scale is not None) == (input_scale is not None)
    with torch.no_grad():
        assert torch.equal(q(X).logits, lib(X).logits)  # same fp8 activation rounding as the library
