"""``convert``: any readable checkpoint -> a plain bf16 folder that transformers loads without a
quantization config; its logits match the dequantized quantized model within bf16 tolerance; the
write is atomic and bad input is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import polyquant
from helpers import tiny_llama, tiny_qwen2, tiny_tokenizer_dir
from polyquant.cli import main
from polyquant.convert import convert
from polyquant.formats import CheckpointError, load, save
from polyquant.methods.fp8 import FbgemmFp8Config, Fp8BlockConfig, Fp8Config
from polyquant.nn.quant_linear import QuantLinear

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

CASES = {
    "fp8-block": (tiny_llama, Fp8BlockConfig(weight_block_size=[32, 48]), None),
    "fbgemm-fp8": (tiny_qwen2, FbgemmFp8Config(), None),  # with biases
    "ct-fp8-dynamic": (tiny_llama, Fp8Config(), None),
    "rtn-w4-gptq": (tiny_llama, polyquant.RTNConfig(bits=4, group_size=32), "gptq"),  # an integer format
}


def _dequantized_reference(q):
    """The quantized model with float activations (what a float checkpoint can hold)."""
    ref = copy.deepcopy(q)
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.act_quant = None
    return ref


@pytest.mark.parametrize("case", list(CASES))
def test_convert_loads_in_plain_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM
    make, cfg, fmt = CASES[case]
    q = polyquant.quantize(make(), cfg, show_progress=False)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path / "tok"))
    ckpt = save(q, tmp_path / "ckpt", format=fmt, tokenizer=tok)
    with pytest.warns(UserWarning, match="activations") if q.model.layers[0].mlp.up_proj.act_quant is not None \
            else _no_warning():
        out = convert(ckpt, "bf16", tmp_path / "bf16")
    cfg_json = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg_json and cfg_json["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and not (out / "polyquant.json").exists()
    sd = load_file(out / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert getattr(hf, "hf_quantizer", None) is None and hf.dtype == torch.bfloat16
    assert all(type(m) is torch.nn.Linear for n, m in hf.named_modules() if n.endswith("_proj"))
    loaded, _ = load(ckpt)  # what the checkpoint holds (GPTQ rounds scales to fp16 on save)
    ref = _dequantized_reference(loaded)
    for n, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(hf.get_submodule(n).weight, m.quantized_weight.dequantize().bfloat16()), n
    with torch.no_grad():
        y, r = hf(X).logits.float(), ref(X).logits
    assert float((y - r).abs().max() / r.abs().max()) < 3e-2  # bf16 weights and activations


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_convert_fp32_is_exact(tmp_path):
    q = polyquant.quantize(tiny_llama(), Fp8Config(activations="none"), show_progress=False)
    out = convert(save(q, tmp_path / "ckpt"), "fp32", tmp_path / "fp32")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.equal(hf(X).logits, q(X).logits)


def test_bad_input_and_atomicity(tmp_path):
    q = polyquant.quantize(tiny_llama(), Fp8BlockConfig(), show_progress=False)
    ckpt = save(q, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="to must be one of"):
        convert(ckpt, "int8", tmp_path / "x")
    with pytest.raises(ValueError, match="must differ"):
        convert(ckpt, "bf16", ckpt)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        convert(ckpt, "bf16", tmp_path / "exists")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [0, 128]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weight_block_size"):
        convert(ckpt, "bf16", tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))  # nothing left behind


def test_cli_convert(tmp_path, capsys):
    q = polyquant.quantize(tiny_llama(), Fp8BlockConfig(), show_progress=False)
    ckpt = save(q, tmp_path / "ckpt")
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out")]) == 2  # exists, no --overwrite
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out"), "--overwrite", "--to", "fp16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert main(["convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "o2")]) == 2
    assert "polyquant: error:" in capsys.readouterr().err
