"""The AQLM format: a checkpoint written from the specification (independently of polyquant's writer)
loads and dequantizes per the formula; signed code storage; save -> load; refusals; transformers +
aqlm read what polyquant writes (when the aqlm package is installed)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyquant
from polyquant.formats import CheckpointError
from polyquant.formats.aqlm import pack_codes, unpack_codes
from polyquant.methods.aqlm import AQLMConfig
from tests.helpers import tiny_llama

X = torch.randint(0, 256, (1, 12))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def write_aqlm_checkpoint(folder, m: int, b: int, og: int = 1, ig: int = 8, seed: int = 0):
    """An AQLM checkpoint as the specification describes it, built by hand: every decoder Linear as
    ``codes`` (smallest signed int, code - 2**b above 2**(b-1)) ``[out/og, in/ig, m]``, ``codebooks`` fp16
    ``[m, 2**b, og, ig]``, ``scales`` fp16 ``[out/og, 1, 1, 1]``. Returns the model and the unsigned codes."""
    model = tiny_llama(seed=seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    t = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    raw = {}
    for i in range(len(model.model.layers)):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            w = t.pop(f"{name}.weight")
            out, inp = w.shape
            codes = torch.randint(0, 1 << b, (out // og, inp // ig, m), generator=g)
            stored = codes.clone()
            stored[stored >= 1 << (b - 1)] -= 1 << b
            t[f"{name}.codes"] = stored.to(torch.int8 if b <= 8 else torch.int16)
            t[f"{name}.codebooks"] = (torch.randn(m, 1 << b, og, ig, generator=g) * 0.05).half()
            t[f"{name}.scales"] = (torch.rand(out // og, 1, 1, 1, generator=g) + 0.5).half()
            raw[name] = codes
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "aqlm", "in_group_size": ig, "out_group_size": og,
                                  "num_codebooks": m, "nbits_per_codebook": b,
                                  "linear_weights_not_to_quantize": ["lm_head", "lm_head.weight"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return t, raw


def _formula(t, name, codes):
    """W[o-block, i-block] = scales[o] * sum_m codebooks[m, codes[o, i, m]], by explicit loops."""
    cb, sc = t[f"{name}.codebooks"].float(), t[f"{name}.scales"].float()
    ob, ib, m = codes.shape
    _, _, og, ig = cb.shape
    W = torch.zeros(ob * og, ib * ig)
    for o in range(ob):
        for i in range(ib):
            v = torch.zeros(og, ig)
            for c in range(m):
                v += cb[c, codes[o, i, c]]
            W[o * og:(o + 1) * og, i * ig:(i + 1) * ig] = v * sc[o, 0, 0, 0]
    return W


@pytest.mark.parametrize("m, b, og", [(2, 8, 1), (1, 16, 1), (1, 4, 2)])
def test_hand_built_checkpoint_dequantizes_per_formula(tmp_path, m, b, og):
    folder = tmp_path / "ck"
    t, raw = write_aqlm_checkpoint(folder, m, b, og)
    assert polyquant.detect_format(folder) == "aqlm"
    model, _ = polyquant.load(folder)
    mods = dict(model.named_modules())
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        qw = mods[name].quantized_weight
        assert torch.equal(qw.codes.long(), raw[name])
        assert torch.allclose(qw.dequantize(), _formula(t, name, raw[name]), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.isfinite(model(X).logits).all()


@pytest.mark.parametrize("bits", [8, 16, 4, 12])
def test_signed_code_storage_round_trips(bits):
    codes = torch.arange(1 << bits)
    stored = pack_codes(codes, bits)
    assert stored.dtype == (torch.int8 if bits <= 8 else torch.int16)
    want = torch.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    assert torch.equal(stored.long(), want)
    assert torch.equal(unpack_codes(stored, bits).long(), codes)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = tiny_llama()
    calib = [torch.randint(0, 256, (1, 32)) for _ in range(4)]
    q = polyquant.quantize(m, AQLMConfig(max_iters=2, init_iters=4), calibration=calib, show_progress=False)
    out = polyquant.save(q, tmp_path_factory.mktemp("aqlm") / "ck")
    return q, out


def test_on_disk_layout(saved):
    q, out = saved
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 2,
                   "nbits_per_codebook": 8, "linear_weights_not_to_quantize": ["lm_head", "lm_head.weight"]}
    t = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert t[f"{name}.codes"].dtype == torch.int8 and t[f"{name}.codes"].shape == (64, 16, 2)
    assert t[f"{name}.codebooks"].dtype == torch.float16 and t[f"{name}.codebooks"].shape == (2, 256, 1, 8)
    assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (64, 1, 1, 1)
    qw = q.model.layers[0].mlp.down_proj.quantized_weight
    assert torch.equal(t[f"{name}.codes"], qw.data.view(torch.int8))  # 8 bits: two's complement of the index
    assert f"{name}.weight" not in t


def test_missing_codebooks_and_bad_config(saved, tmp_path):
    _, out = saved
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    t = load_file(str(bad / "model.safetensors"))
    del t["model.layers.1.self_attn.v_proj.codebooks"]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="v_proj.*codebooks"):
        polyquant.load(bad)
    bad2 = tmp_path / "bad2"
    shutil.copytree(out, bad2)
    cfg = json.loads((bad2 / "config.json").read_text())
    cfg["quantization_config"]["nbits_per_codebook"] = 17
    (bad2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="nbits_per_codebook"):
        polyquant.load(bad2)
    bad3 = tmp_path / "bad3"
    shutil.copytree(out, bad3)
    cfg["quantization_config"]["nbits_per_codebook"] = 8
    cfg["quantization_config"]["in_group_size"] = 7
    (bad3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"AQLM layer .*in_group_size 7 does not divide in_features \d+"):
        polyquant.load(bad3)


def test_transformers_with_aqlm_reads_it(saved):
    pytest.importorskip("aqlm")
    numba = pytest.importorskip("numba")
    from transformers import AutoModelForCausalLM
    q, out = saved
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    assert isinstance(hf.lm_head, torch.nn.Linear)
    # aqlm 1.1.7's Numba kernel accumulates outputs inside a prange over input groups: a data race
    # with more than one Numba thread (its results then vary from call to call); one thread is exact
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with torch.no_grad():
            a, b = q(X).logits.double().flatten(), hf(X).logits.double().flatten()
            b2 = hf(X).logits.double().flatten()  # after its in-place code permutation
    finally:
        numba.set_num_threads(n)
    assert torch.equal(b, b2)
    assert torch.isfinite(b).all()
    assert float(torch.nn.functional.cosine_similarity(a, b, 0)) > 0.9999
