"""BitNet format: the packing against transformers' ``pack_weights`` / the specification (out_features not
divisible by 4 included), both ``weight_scale`` conventions, interop with plain transformers (BitLinear and
AutoBitLinear, eager: ``torch.compile`` disabled) both ways, ``use_rms_norm``, and refusals naming the layer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import polyquant
from helpers import tiny_llama
from polyquant.formats import CheckpointError, load, save
from polyquant.formats.bitnet import pack_bitnet, should_convert, unpack_bitnet
from polyquant.methods.bitnet import BitNetConfig

IDS = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))


def spec_pack(values: torch.Tensor) -> torch.Tensor:
    """The specification, element by element: ``R = ceil(out/4)``; byte ``[r, k]`` holds ``value + 1`` of
    rows ``r, R+r, 2R+r, 3R+r`` in bits ``0-1, 2-3, 4-5, 6-7``."""
    out, inp = values.shape
    r_ = -(-out // 4)
    packed = [[0] * inp for _ in range(r_)]
    v = values.tolist()
    for row in range(out):
        chunk, r = divmod(row, r_)
        for k in range(inp):
            packed[r][k] |= (int(v[row][k]) + 1) << (2 * chunk)
    return torch.tensor(packed, dtype=torch.uint8)


def write_spec_checkpoint(model, folder: Path, linear_class: str, use_rms_norm: bool = False,
                          scale_dtype: torch.dtype = torch.float32, mode: str = "offline") -> Path:
    """A BitNet checkpoint of ``model`` in transformers' layout, written from the specification (not by
    polyquant): absmean per tensor, every decoder Linear converted, lm_head in modules_to_not_convert."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    for k, t in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in linears and k.endswith(".weight") and mode == "online":
            tensors[k] = t.detach().clone().contiguous()
        elif mod in linears and k.endswith(".weight"):
            w = t.float()
            ws = 1.0 / w.abs().mean().clamp(min=1e-5)
            vals = (w * ws).round().clamp(-1, 1)
            tensors[k] = spec_pack(vals)
            tensors[f"{mod}.weight_scale"] = (ws if linear_class == "bitlinear" else 1.0 / ws).reshape(1).to(scale_dtype)
            if use_rms_norm:
                tensors[f"{mod}.rms_norm.weight"] = 1 + 0.1 * torch.randn(w.shape[1], generator=g)
        elif k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        else:
            tensors[k] = t.detach().clone().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": mode, "use_rms_norm": use_rms_norm,
                                  "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def hf_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    with torch._dynamo.config.patch(disable=True):  # eager BitLinear (the same arithmetic, no 30 s compile)
        m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        with torch.no_grad():
            return m(IDS).logits


def _logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(IDS).logits


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# -- packing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("out", [1, 2, 3, 4, 5, 6, 7, 9, 13, 16, 30])
def test_pack_matches_spec_and_transformers_and_round_trips(out):
    from transformers.integrations.bitnet import pack_weights
    g = torch.Generator().manual_seed(out)
    vals = torch.randint(-1, 2, (out, 5), generator=g)
    codes = (vals + 1).to(torch.uint8)
    p = pack_bitnet(codes)
    assert p.dtype == torch.uint8 and p.shape == (math.ceil(out / 4), 5)
    assert torch.equal(p, spec_pack(vals))
    assert torch.equal(p, pack_weights(vals.clone()))
    assert torch.equal(unpack_bitnet(p, out), codes)


def test_should_convert_follows_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module
    pats = ["lm_head", "model.layers.1", "mlp.gate"]
    for name in ["lm_head", "model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj", "model.layers.0.mlp.gate_proj",
                 "x.mlp.gate"]:
        assert should_convert(name, pats) == should_convert_module(name, pats), name


# -- save: both classes, read back, transformers -------------------------------------------------
@pytest.mark.parametrize("cls", ["bitlinear", "autobitlinear"])
def test_save_load_and_transformers_interop(tmp_path, cls):
    model = tiny_llama(tie=False)
    q = polyquant.quantize(model, BitNetConfig(linear_class=cls), show_progress=False)
    out = save(q, tmp_path / cls)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["linear_class"] == cls and cfg["quantization_mode"] == "offline" and cfg["use_rms_norm"] is False
    assert "lm_head" in cfg["modules_to_not_convert"]
    st = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    qw = q.get_submodule(name).quantized_weight
    assert st[f"{name}.weight"].dtype == torch.uint8 and st[f"{name}.weight"].shape == (16, 128)
    assert torch.equal(st[f"{name}.weight"], spec_pack(qw.codes.long() - 1))
    m = model.get_submodule(name).weight.abs().mean()
    ws = st[f"{name}.weight_scale"]
    assert torch.allclose(ws, 1 / m if cls == "bitlinear" else m.reshape(1), rtol=1e-6)
    back, _ = load(out)
    assert torch.equal(back.get_submodule(name).quantized_weight.codes, qw.codes)
    a, b, c = _logits(q), _logits(back), hf_logits(out)
    assert torch.equal(a, b)
    assert _cos(b, c) > 0.9999
    if cls == "bitlinear":  # the same arithmetic as transformers' BitLinear, to the bit
        assert torch.equal(b, c)
    else:  # AutoBitLinear fake-quantizes in float: rounding differences only
        assert float((b - c).abs().max()) < 1e-2 * float(c.abs().max())


def test_both_conventions_give_the_same_weight(tmp_path):
    model = tiny_llama(tie=False)
    a = write_spec_checkpoint(model, tmp_path / "a", "bitlinear")
    b = write_spec_checkpoint(model, tmp_path / "b", "autobitlinear")
    ma, _ = load(a)
    mb, _ = load(b)
    for n, m in ma.named_modules():
        if hasattr(m, "quantized_weight"):
            wa, wb = m.quantized_weight.dequantize(), mb.get_submodule(n).quantized_weight.dequantize()
            assert torch.equal(m.quantized_weight.codes, mb.get_submodule(n).quantized_weight.codes)
            assert torch.allclose(wa, wb, rtol=2e-7, atol=0)
    assert _cos(_logits(ma), _logits(mb)) > 0.99999


@pytest.mark.parametrize("cls,norm", [("bitlinear", False), ("autobitlinear", False), ("bitlinear", True)])
def test_spec_checkpoint_loads_with_transformers_logits(tmp_path, cls, norm):
    folder = write_spec_checkpoint(tiny_llama(tie=True), tmp_path / "spec", cls, use_rms_norm=norm)
    ours, _ = load(folder)
    kinds = {m.kernel_name for m in ours.modules() if hasattr(m, "kernel_name")}
    assert kinds == {"cpu-ternary"}
    a, c = _logits(ours), hf_logits(folder)
    assert _cos(a, c) > 0.9999
    if cls == "bitlinear":
        assert float((a - c).abs().max()) <= 1e-5 * float(c.abs().max())
    if norm:  # the norm is carried and saved back
        again = save(ours, tmp_path / "again", format="bitnet")
        st = load_file(str(again / "model.safetensors"))
        ref = load_file(str(folder / "model.safetensors"))
        k = "model.layers.0.self_attn.q_proj"
        assert torch.equal(st[f"{k}.rms_norm.weight"], ref[f"{k}.rms_norm.weight"])
        assert torch.equal(st[f"{k}.weight"], ref[f"{k}.weight"])
        if cls == "bitlinear":
            assert torch.equal(st[f"{k}.weight_scale"], ref[f"{k}.weight_scale"])


def test_bf16_scales_and_online_checkpoints_load(tmp_path):
    model = tiny_llama(tie=True)
    folder = write_spec_checkpoint(model, tmp_path / "bf16", "autobitlinear", scale_dtype=torch.bfloat16)
    ours, _ = load(folder)
    st = load_file(str(folder / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj"
    assert float(ours.get_submodule(k).quantized_weight.scale) == float(st[f"{k}.weight_scale"])
    assert _cos(_logits(ours), hf_logits(folder)) > 0.9999
    online = write_spec_checkpoint(model, tmp_path / "online", "autobitlinear", mode="online")
    ours, _ = load(online)  # float weights ternarized once with the same absmean rule
    assert {m.kernel_name for m in ours.modules() if hasattr(m, "kernel_name")} == {"cpu-ternary"}
    assert _cos(_logits(ours), hf_logits(online)) > 0.9999


# -- refusals ---------------------------------------------------------------------------------
def _corrupt(folder: Path, key: str, value: torch.Tensor) -> None:
    st = load_file(str(folder / "model.safetensors"))
    st[key] = value
    save_file(st, str(folder / "model.safetensors"))


def test_bad_checkpoints_are_refused_naming_the_layer(tmp_path):
    model = tiny_llama(tie=False)
    name = "model.layers.1.self_attn.o_proj"
    cases = {
        "dtype": lambda w: w.to(torch.int8),
        "shape": lambda w: torch.cat([w, w[:1]]),
        "code3": lambda w: torch.full_like(w, 0xFF),
    }
    for case, fn in cases.items():
        folder = write_spec_checkpoint(model, tmp_path / case, "bitlinear")
        st = load_file(str(folder / "model.safetensors"))
        _corrupt(folder, f"{name}.weight", fn(st[f"{name}.weight"]))
        with pytest.raises(CheckpointError, match=name) as e:
            load(folder)
        msg = str(e.value)
        assert {"dtype": "uint8", "shape": "ceil(64/4)", "code3": "code 3"}[case] in msg


def test_save_refuses_what_bitnet_cannot_hold(tmp_path):
    model = tiny_llama(tie=False)
    per_channel = polyquant.quantize(model, BitNetConfig(granularity="channel"), show_progress=False)
    with pytest.raises(ValueError, match="one scale per tensor"):
        save(per_channel, tmp_path / "c")
    from polyquant.methods.rtn import RTNConfig
    rtn = polyquant.quantize(model, RTNConfig(bits=4, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="ternary"):
        save(rtn, tmp_path / "r", format="bitnet")
