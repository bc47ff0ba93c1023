"""Fine-grained fp8 checkpoints (``quant_method: fp8``, DeepSeek-V3 layout): exact round trips with
partial blocks (hidden 64 < a 128 block), transformers' own reader, checkpoints written by hand from
the specification (partial 2-D blocks, static activations), and clear errors for bad ones."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyquant
from helpers import tiny_llama, qweights, reload_same_logits
from polyquant.formats import CheckpointError, checkpoint_info, load, save
from polyquant.kernels.fp8 import Fp8ActQuant
from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig, Fp8Config
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import replace_module

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module", params=[[128, 128], [32, 48]], ids=["b128", "b32x48"])
def quantized(request, llama):
    return polyquant.quantize(llama, Fp8BlockConfig(weight_block_size=request.param), show_progress=False)


@pytest.mark.parametrize("record", [True, False])
def test_round_trip_identical_logits(quantized, tmp_path, record):
    # without the record: a foreign reader's view, the rule comes from the config
    q2, a, b = reload_same_logits(quantized, tmp_path / "ckpt", X, record=record)
    assert len(a) == 14
    for n in a:
        assert a[n].block == b[n].block and torch.equal(a[n].scale, b[n].scale)
        assert torch.equal(a[n].data.view(torch.uint8), b[n].data.view(torch.uint8))
        act = q2.get_submodule(n).act_quant
        assert (act.recipe, act.group_size) == ("deepseek", a[n].block[1])


def test_exact_layout(quantized, tmp_path):
    path = save(quantized, tmp_path / "ckpt")
    block = quantized.model.layers[0].mlp.up_proj.quantized_weight.block
    sd = load_file(path / "model.safetensors")
    p = "model.layers.1."
    for lin, (out, inp) in zip(LINEARS, SHAPES):
        assert {k[len(p + lin) + 1:] for k in sd if k.startswith(p + lin + ".")} == {"weight", "weight_scale_inv"}
        w, s = sd[f"{p}{lin}.weight"], sd[f"{p}{lin}.weight_scale_inv"]
        assert (w.dtype, tuple(w.shape)) == (torch.float8_e4m3fn, (out, inp))
        grid = (math.ceil(out / block[0]), math.ceil(inp / block[1]))
        assert (s.dtype, tuple(s.shape)) == (torch.float32, grid)
        # weight_scale_inv is multiplied: W = q * weight_scale_inv, block-expanded (partial edge blocks)
        full = s.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
        assert torch.equal(w.float() * full, quantized.get_submodule(p + lin).quantized_weight.dequantize())
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    info = checkpoint_info(path)
    assert info["format"] == "fp8" and info["quantized_layers"] == 14 and info["group_size"] == block[1]


@pytest.mark.parametrize("block", [[128, 128], [32, 32]])
def test_transformers_reads_our_checkpoint(llama, tmp_path, block):
    """transformers' FineGrainedFP8 reader: on CPU it dequantizes (``q * weight_scale_inv``) -- its
    weights must equal ours bit for bit; and its FP8Linear modules take our tensors shape for shape."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Linear, replace_with_fp8_linear
    quantized = polyquant.quantize(llama, Fp8BlockConfig(weight_block_size=block), show_progress=False)
    path = save(quantized, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for n, qw in qweights(quantized).items():
        assert torch.equal(hf.get_submodule(n).weight, qw.dequantize()), n
    ours = copy.deepcopy(quantized)
    for m in ours.modules():
        if isinstance(m, QuantLinear):
            m.act_quant = None  # transformers' dequantized model runs float activations
    with torch.no_grad():
        assert torch.allclose(hf(X).logits, ours(X).logits, rtol=1e-5, atol=1e-5)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    skel = tiny_llama()
    replace_with_fp8_linear(skel, modules_to_not_convert=qc["modules_to_not_convert"],
                            quantization_config=FineGrainedFP8Config(**qc), pre_quantized=True)
    assert {n for n, m in skel.named_modules() if isinstance(m, FP8Linear)} == set(qweights(quantized))
    missing, unexpected = skel.load_state_dict(load_file(path / "model.safetensors"), strict=False, assign=True)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}


def test_transformers_cpu_dequantize_refuses_partial_blocks(llama, tmp_path):
    """Known limitation of transformers 5.24 (not of the format): its CPU path (dequantize) derives the
    block from ``shape // grid`` and fails on a layer whose shape the grid does not divide (a partial
    edge block, e.g. 576 with 128 blocks: the default model). Its GPU FP8Linear allocates the ceil
    grid and reads them; on CPU, ``polyquant convert`` gives transformers a bf16 folder."""
    from transformers import AutoModelForCausalLM
    q = polyquant.quantize(llama, Fp8BlockConfig(weight_block_size=[32, 48]), show_progress=False)
    path = save(q, tmp_path / "ckpt")  # down_proj [64, 128] in 32 x 48 blocks: grid [2, 3], 128 % 3 != 0
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    q2, _ = load(path)  # polyquant reads it
    with torch.no_grad():
        assert torch.equal(q2(X).logits, q(X).logits)


# -- written from the specification -------------------------------------------------------------------
def _spec_checkpoint(path, model, qcfg, tensors):
    path.mkdir()
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(cfg))
    prefixes = tuple(n + "." for n in tensors)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes) and k != "lm_head.weight"}
    for n, t in tensors.items():
        sd.update({f"{n}.{k}": v.contiguous() for k, v in t.items()})
    save_file(sd, str(path / "model.safetensors"))
    return path


def _expand(s, block, shape):
    return s.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def _hand_tensors(model, block, seed=0, static=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        for lin in LINEARS:
            n = f"model.layers.{i}.{lin}"
            o, k = model.get_submodule(n).weight.shape
            grid = (math.ceil(o / block[0]), math.ceil(k / block[1]))
            t = {"weight": (torch.randn(o, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                 "weight_scale_inv": torch.rand(grid, generator=g) * 1e-3 + 1e-4}
            if static:
                t["activation_scale"] = torch.tensor(0.01 + 0.01 * i)
            out[n] = t
    return out


def _reference(model, tensors, block, act_for):
    ref = copy.deepcopy(model)
    for n, t in tensors.items():
        lin = ref.get_submodule(n)
        lin.weight.data = t["weight"].float() * _expand(t["weight_scale_inv"], block, lin.weight.shape)
        act = act_for(t)
        lin.register_forward_pre_hook(lambda mod, args, act=act: (act(args[0]),))
    return ref


def test_spec_built_checkpoint_partial_blocks(llama, tmp_path):
    block = (32, 48)  # 64 -> 2 block columns, the last 16 wide; 128 -> 3, the last 32 wide
    tensors = _hand_tensors(llama, block)
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 48]}
    path = _spec_checkpoint(tmp_path / "spec", llama, qcfg, tensors)
    q, _ = load(path)
    assert not isinstance(q.lm_head, QuantLinear)  # no modules_to_not_convert: the head stays float
    for n, t in tensors.items():
        qw = q.get_submodule(n).quantized_weight
        assert qw.block == block and tuple(qw.scale.shape) == tuple(t["weight_scale_inv"].shape)
        assert torch.equal(qw.dequantize(), t["weight"].float() * _expand(t["weight_scale_inv"], block, qw.shape))
    ref = _reference(llama, tensors, block, lambda t: Fp8ActQuant("deepseek", 48))
    with torch.no_grad():
        assert torch.equal(q(X).logits, ref(X).logits)


def test_spec_built_static_activations(llama, tmp_path):
    tensors = _hand_tensors(llama, (128, 128), static=True)
    qcfg = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}
    path = _spec_checkpoint(tmp_path / "static", llama, qcfg, tensors)
    q, _ = load(path)
    act = q.model.layers[1].mlp.up_proj.act_quant
    assert act.static and act.scale.item() == pytest.approx(0.02)
    ref = _reference(llama, tensors, (128, 128), lambda t: Fp8ActQuant("deepseek", scale=t["activation_scale"]))
    with torch.no_grad():
        assert torch.equal(q(X).logits, ref(X).logits)


def test_spec_built_per_tensor(llama, tmp_path):
    tensors = _hand_tensors(llama, (10 ** 6, 10 ** 6))
    for t in tensors.values():
        t["weight_scale_inv"] = t["weight_scale_inv"].reshape(())  # transformers' per-tensor parameter shape
    path = _spec_checkpoint(tmp_path / "pt", llama, {"quant_method": "fp8", "weight_block_size": None}, tensors)
    q, _ = load(path)
    m = q.model.layers[0].mlp.down_proj
    assert m.quantized_weight.block == (64, 128) and m.act_quant.group_size is None
    ref = _reference(llama, {n: {**t, "weight_scale_inv": t["weight_scale_inv"].reshape(1, 1)} for n, t in tensors.items()},
                     (10 ** 6, 10 ** 6), lambda t: Fp8ActQuant("deepseek"))
    with torch.no_grad():
        assert torch.equal(q(X).logits, ref(X).logits)


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [[0, 128], [128], 128, [128.5, 128], "128", [True, 128], [-128, 128]])
def test_bad_block_size(llama, tmp_path, bs):
    path = _spec_checkpoint(tmp_path / "bs", llama, {"quant_method": "fp8", "weight_block_size": bs},
                            _hand_tensors(llama, (128, 128)))
    with pytest.raises(CheckpointError, match="weight_block_size must be two positive integers"):
        load(path)


@pytest.mark.parametrize("case,edit,match", [
    ("grid", lambda t: t.update(weight_scale_inv=torch.ones(1, 1)), r"weight_scale_inv has shape \[1, 1\], expected \[4, 2\]"),
    ("nan", lambda t: t["weight_scale_inv"].__setitem__((0, 0), float("nan")), "NaN"),
    ("inf", lambda t: t["weight_scale_inv"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
    ("dtype", lambda t: t.update(weight=t["weight"].to(torch.float8_e5m2)), "float8_e4m3fn"),
    ("missing", lambda t: t.pop("weight"), r"missing tensor\(s\) \['weight'\]"),
    ("static", lambda t: t.update(activation_scale=torch.tensor(1.0)), "unexpected tensor.*activation_scale"),
])
def test_bad_tensors_name_the_layer(llama, tmp_path, case, edit, match):
    tensors = _hand_tensors(llama, (32, 32))
    edit(tensors["model.layers.1.mlp.up_proj"])  # [128, 64] in 32 x 32 blocks: a [4, 2] scale grid
    path = _spec_checkpoint(tmp_path / case, llama, {"quant_method": "fp8", "weight_block_size": [32, 32]}, tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*" + match):
        load(path)


@pytest.mark.parametrize("extra,match", [({"scale_fmt": "ue8m0"}, "ue8m0"), ({"activation_scheme": "weird"}, "activation_scheme"),
                                         ({"modules_to_convert": ["embed_tokens"]}, "modules_to_convert"),
                                         ({"fmt": "e5m2"}, "e4m3 only")])
def test_unsupported_configs_refused(llama, tmp_path, extra, match):
    qcfg = {"quant_method": "fp8", "weight_block_size": [128, 128], **extra}
    path = _spec_checkpoint(tmp_path / "cfg", llama, qcfg, _hand_tensors(llama, (128, 128)))
    with pytest.raises(CheckpointError, match=match):
        load(path)


def test_save_refusals(llama, tmp_path):
    for cfg in (FbgemmFp8Config(), Fp8Config(weights="block", block_size=[32, 32])):
        q = polyquant.quantize(llama, cfg, show_progress=False)
        with pytest.raises(ValueError, match=r"cannot store layer 'model\.layers\.0\.[a-z_.]+'.*DeepSeek rule"):
            save(q, tmp_path / "bad", format="fp8")
    q = polyquant.quantize(llama, Fp8BlockConfig(), show_progress=False)
    other = polyquant.quantize(llama, Fp8BlockConfig(weight_block_size=[32, 32]), show_progress=False)
    replace_module(q, "model.layers.1.mlp.up_proj", other.model.layers[1].mlp.up_proj)
    with pytest.raises(ValueError, match="one weight_block_size"):
        save(q, tmp_path / "bad", format="fp8")
    assert not (tmp_path / "bad").exists()
