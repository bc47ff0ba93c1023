"""fbgemm_fp8 checkpoints: exact round trips, the on-disk layout transformers' ``FbgemmFp8Linear``
expects, checkpoints written by hand from the specification, and clear errors for bad ones."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyquant
from helpers import tiny_llama, tiny_qwen2, qweights, reload_same_logits
from polyquant.formats import CheckpointError, checkpoint_info, load, save
from polyquant.kernels.fp8 import Fp8ActQuant
from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig, Fp8Config
from polyquant.nn.quant_linear import QuantLinear

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def quantized(llama):
    return polyquant.quantize(llama, FbgemmFp8Config(), show_progress=False)


@pytest.mark.parametrize("record", [True, False])
def test_round_trip_identical_logits(quantized, tmp_path, record):
    # without the record: a foreign reader's view, the rule comes from the config
    q2, a, b = reload_same_logits(quantized, tmp_path / "ckpt", X, record=record)
    assert len(a) == 14
    for n in a:
        assert torch.equal(a[n].data.view(torch.uint8), b[n].data.view(torch.uint8)) and torch.equal(a[n].scale, b[n].scale)
        m = q2.get_submodule(n)
        assert m.kernel_name == "fp8-emulated" and m.act_quant.recipe == "fbgemm" and m.act_quant.scale_ub == 1200.0
    assert q2.polyquant.format == "fbgemm_fp8"
    assert q2.polyquant.method == ("fbgemm-fp8" if record else "fbgemm_fp8")


def test_round_trip_with_bias_and_custom_ub(tmp_path):
    q = polyquant.quantize(tiny_qwen2(), FbgemmFp8Config(activation_scale_ub=3.0), show_progress=False)
    path = save(q, tmp_path / "qwen")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["activation_scale_ub"] == 3.0
    (path / "polyquant.json").unlink()
    q2, _ = load(path)
    assert q2.model.layers[0].self_attn.q_proj.act_quant.scale_ub == 3.0
    with torch.no_grad():
        assert torch.equal(q2(X).logits, q(X).logits)


def test_exact_layout(quantized, tmp_path):
    path = save(quantized, tmp_path / "ckpt")
    sd = load_file(path / "model.safetensors")
    p = "model.layers.0."
    for lin, (out, inp) in zip(LINEARS, [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]):
        keys = {k[len(p + lin) + 1:] for k in sd if k.startswith(p + lin + ".")}
        assert keys == {"weight", "weight_scale"}, lin
        w, s = sd[f"{p}{lin}.weight"], sd[f"{p}{lin}.weight_scale"]
        assert (w.dtype, tuple(w.shape)) == (torch.float8_e4m3fn, (out, inp))
        assert (s.dtype, tuple(s.shape)) == (torch.float32, (out, 1))
        ref = quantized.get_submodule(p + lin).quantized_weight
        assert torch.equal(w.float() * s, ref.dequantize())
    assert "lm_head.weight" not in sd and sd["model.embed_tokens.weight"].dtype == torch.float32
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    info = checkpoint_info(path)
    assert info["format"] == "fbgemm_fp8" and info["quantized_layers"] == 14 and info["bits"] == 8


def test_transformers_fbgemm_modules_take_our_tensors(quantized, tmp_path, monkeypatch):
    """transformers' own FbgemmFp8Linear swap (pre-quantized) over the model skeleton: exactly our
    quantized layers become FbgemmFp8Linear and our tensors fill their parameters shape for shape
    (running them needs fbgemm-gpu on a GPU)."""
    from transformers import FbgemmFp8Config as HfFbgemmFp8Config
    from transformers.integrations import fbgemm_fp8 as hf_fbgemm
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear, replace_with_fbgemm_fp8_linear
    monkeypatch.setattr(hf_fbgemm, "get_quantize_fp8_per_row", lambda: None)  # the GPU op, only used in forward
    path = save(quantized, tmp_path / "ckpt")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    skel = tiny_llama()
    replace_with_fbgemm_fp8_linear(skel, modules_to_not_convert=qc["modules_to_not_convert"],
                                   quantization_config=HfFbgemmFp8Config(**qc), pre_quantized=True)
    fb = {n for n, m in skel.named_modules() if isinstance(m, FbgemmFp8Linear)}
    assert fb == set(qweights(quantized))
    sd = load_file(path / "model.safetensors")
    missing, unexpected = skel.load_state_dict(sd, strict=False, assign=True)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    m = skel.model.layers[1].mlp.down_proj
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (64, 1)
    assert torch.equal(m.weight.float() * m.weight_scale, quantized.model.layers[1].mlp.down_proj.quantized_weight.dequantize())


# -- checkpoints written from the specification (not by our writer) -------------------------------------
def _spec_checkpoint(path, model, qcfg, layer_tensors, skip_float=()):
    """A folder laid out as the format specifies: config.json with quantization_config, float
    tensors of the non-quantized modules, ``layer_tensors[name]`` for the quantized ones."""
    path.mkdir()
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(cfg))
    prefixes = tuple(n + "." for n in layer_tensors)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.startswith(prefixes) and k != "lm_head.weight" and k not in skip_float}
    for n, t in layer_tensors.items():
        sd.update({f"{n}.{k}": v.contiguous() for k, v in t.items()})
    save_file(sd, str(path / "model.safetensors"))
    return path


def _hand_tensors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        for lin in LINEARS:
            n = f"model.layers.{i}.{lin}"
            o, k = model.get_submodule(n).weight.shape
            codes = (torch.randn(o, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[n] = {"weight": codes, "weight_scale": torch.rand(o, 1, generator=g) * 1e-3 + 1e-4}
    return out


def _expected_model(model, tensors, act):
    """The float model with ``W = weight * weight_scale`` and ``act`` applied to every quantized input."""
    import copy
    ref = copy.deepcopy(model)
    for n, t in tensors.items():
        lin = ref.get_submodule(n)
        lin.weight.data = t["weight"].float() * t["weight_scale"]
        lin.register_forward_pre_hook(lambda mod, args: (act(args[0]),))
    return ref


def test_spec_built_checkpoint_loads(llama, tmp_path):
    tensors = _hand_tensors(llama)
    qcfg = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 0.5, "modules_to_not_convert": ["lm_head"]}
    path = _spec_checkpoint(tmp_path / "spec", llama, qcfg, tensors)
    assert polyquant.detect_format(path) == "fbgemm_fp8"
    q, _ = load(path)
    assert q.polyquant.extra["written_by"] == "foreign"
    for n, t in tensors.items():
        assert torch.equal(q.get_submodule(n).quantized_weight.dequantize(), t["weight"].float() * t["weight_scale"])
    ref = _expected_model(llama, tensors, Fp8ActQuant("fbgemm", scale_ub=0.5))
    with torch.no_grad():
        assert torch.equal(q(X).logits, ref(X).logits)
    # default ub (1200) when the key is absent, and modules_to_not_convert absent: the head stays float
    path2 = _spec_checkpoint(tmp_path / "spec2", llama, {"quant_method": "fbgemm_fp8"}, tensors)
    q2, _ = load(path2)
    assert q2.model.layers[0].mlp.up_proj.act_quant.scale_ub == 1200.0 and not isinstance(q2.lm_head, QuantLinear)


def _corrupt(llama, tmp_path, name, edit=None, qcfg=None, drop=None):
    tensors = _hand_tensors(llama)
    t = tensors["model.layers.1.mlp.up_proj"]
    if edit:
        edit(t)
    if drop:
        del tensors[drop]
    return _spec_checkpoint(tmp_path / name, llama, qcfg or {"quant_method": "fbgemm_fp8",
                                                             "modules_to_not_convert": ["lm_head"]}, tensors,
                            skip_float={f"{drop}.weight"} if drop else ())


@pytest.mark.parametrize("case,edit,match", [
    ("shape", lambda t: t.update(weight_scale=torch.ones(128, 2)), r"weight_scale has shape \[128, 2\], expected \[128, 1\]"),
    ("rows", lambda t: t.update(weight_scale=torch.ones(127, 1)), r"weight_scale has shape \[127, 1\]"),
    ("nan", lambda t: t["weight_scale"].__setitem__((3, 0), float("nan")), "weight_scale holds NaN"),
    ("neg", lambda t: t["weight_scale"].__setitem__((3, 0), -1.0), "negative"),
    ("dtype", lambda t: t.update(weight=t["weight"].float()), "weight must be float8_e4m3fn"),
    ("extra", lambda t: t.update(input_scale=torch.ones(1)), r"unexpected tensor\(s\) \['input_scale'\]"),
])
def test_bad_tensors_name_the_layer(llama, tmp_path, case, edit, match):
    path = _corrupt(llama, tmp_path, case, edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*" + match):
        load(path)


@pytest.mark.parametrize("qcfg,match", [
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "activation_scale_ub"),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": "big"}, "activation_scale_ub"),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head", "up_proj"]}, "up_proj.*keeps it in float"),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": "lm_head"}, "must be a list"),
])
def test_bad_config(llama, tmp_path, qcfg, match):
    path = _corrupt(llama, tmp_path, "cfg", qcfg=qcfg)
    with pytest.raises(CheckpointError, match=match):
        load(path)


def test_missing_scale_is_refused(llama, tmp_path):
    """A layer the config converts but that has no weight_scale (its fp8 weight would be read as float)."""
    tensors = _hand_tensors(llama)
    tensors["model.layers.1.mlp.up_proj"].pop("weight_scale")
    path = _spec_checkpoint(tmp_path / "noscale", llama, {"quant_method": "fbgemm_fp8"}, tensors)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj' has no weight_scale"):
        load(path)


def test_save_refusals_name_the_layer(llama, tmp_path):
    for cfg, match in ((Fp8BlockConfig(), "per-channel scales"), (Fp8Config(), "activation rule"),
                       (Fp8Config(activations="none"), "activation rule")):
        q = polyquant.quantize(llama, cfg, show_progress=False)
        with pytest.raises(ValueError, match=r"cannot store layer 'model\.layers\.0\.[a-z_.]+'.*" + match):
            save(q, tmp_path / "bad", format="fbgemm_fp8")
    assert not (tmp_path / "bad").exists()
