"""Corrupt or foreign input: every case is refused with one line naming the file and the problem,
by ``polyquant.load`` (a ``CheckpointError`` / ``ValueError``) and by the CLI (``eval`` and
``quantize -o OUT``: exit status 2, no traceback, nothing written to OUT)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyquant
from helpers import tiny_llama
from interop.conftest import record_corrupt
from polyquant.formats import CheckpointError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A W4 g32 compressed-tensors checkpoint in several shards."""
    q = polyquant.quantize(tiny_llama(seed=2, hidden=128, tie=False), polyquant.RTNConfig(bits=4, group_size=32),
                           show_progress=False, kernel="reference")
    out = polyquant.save(q, tmp_path_factory.mktemp("ck") / "w4", max_shard_size=60_000)
    assert (out / INDEX).is_file()
    return out


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    from polyquant.methods.bnb import BnbNF4Config
    q = polyquant.quantize(tiny_llama(seed=2, hidden=128, tie=False), BnbNF4Config(), show_progress=False, kernel="reference")
    return polyquant.save(q, tmp_path_factory.mktemp("ck") / "nf4")


def _shard_of(folder, key):
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key] if (folder / INDEX).is_file() \
        else folder / "model.safetensors"


def _rewrite(folder, key, fn):
    f = _shard_of(folder, key)
    sd = load_file(str(f))
    sd[key] = fn(sd[key])
    save_file(sd, str(f), metadata={"format": "pt"})
    return f.name


def _truncate(folder):
    f = _shard_of(folder, "model.embed_tokens.weight")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f.name, "truncated"


def _wrong_float_dtype(folder):
    return _rewrite(folder, "model.norm.weight", lambda t: t.to(torch.int32)), r"model\.norm\.weight.*I32"


def _wrong_quant_dtype(folder):
    key = "model.layers.0.mlp.up_proj.weight_packed"
    return _rewrite(folder, key, lambda t: t.float()), r"up_proj.*weight_packed.*(int32|float32)"


def _missing_shard(folder):
    f = _shard_of(folder, "model.layers.1.mlp.down_proj.weight_packed")
    f.unlink()
    return INDEX, rf"missing.*{f.name}"


def _config_not_json(folder):
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], oops')
    return "config.json", "not valid JSON"


def _unknown_method(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "mystery-quant"
    (folder / "config.json").write_text(json.dumps(cfg))
    return "", r"unknown quant_method 'mystery-quant'"


def _no_quantization_config(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return "", r"does not have.*weight_packed.*compressed-tensors.*no quantization_config"


def _absmax_reshaped(folder):
    key = "model.layers.0.self_attn.q_proj.weight.absmax"
    return _rewrite(folder, key, lambda t: t.reshape(2, -1)), \
        r"q_proj'.*weight\.absmax.*expected float32 \[256\], found float32 \[2, 128\]"


CASES = {
    "truncated safetensors shard": ("sharded", _truncate),
    "float tensor stored as int32": ("sharded", _wrong_float_dtype),
    "packed codes stored as float32": ("sharded", _wrong_quant_dtype),
    "missing shard of a sharded checkpoint": ("sharded", _missing_shard),
    "config.json is not JSON": ("sharded", _config_not_json),
    "quantization_config names an unknown method": ("sharded", _unknown_method),
    "quantization_config deleted (quantized tensors, no config)": ("sharded", _no_quantization_config),
    "bitsandbytes absmax [2, 128] instead of the flat [256]": ("nf4", _absmax_reshaped),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_input_is_refused_in_one_line(case, sharded, nf4, tmp_path, capsys):
    base, edit = CASES[case]
    folder = tmp_path / "in"
    shutil.copytree(sharded if base == "sharded" else nf4, folder)
    fname, pattern = edit(folder)
    with pytest.raises(ValueError, match=pattern) as ei:
        polyquant.load(folder)
    msg = str(ei.value)
    assert "\n" not in msg and str(folder) in msg and fname in msg, msg
    from polyquant.cli import main
    capsys.readouterr()
    code = main(["eval", str(folder), "--max-windows", "1"])
    eval_err = capsys.readouterr().err.strip()
    out = tmp_path / "out"
    code_q = main(["quantize", str(folder), "-o", str(out), "--method", "rtn", "--bits", "8"])
    q_err = capsys.readouterr().err.strip()
    for c, e in ((code, eval_err), (code_q, q_err)):
        assert c == 2, e
        assert "Traceback" not in e and len(e.splitlines()) == 1 and str(folder) in e, e
    assert not out.exists() and not list(tmp_path.glob(".out*")), "the failed quantize left files behind"
    record_corrupt(case, msg.replace(str(tmp_path), "DIR"), f"exit {code} / {code_q}: one line, no traceback, "
                                                             "nothing written")


def test_float_folder_with_missing_or_foreign_weights_is_refused(tmp_path):
    """A float folder whose tensors do not match the model: no layer initialised at random, by any
    load path (polyquant.load, load_model), and the foreign keys are named."""
    from polyquant.models import load_model
    folder = tmp_path / "float"
    tiny_llama(seed=4, tie=False).save_pretrained(str(folder))
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    for load in (polyquant.load, load_model):
        with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
            load(folder)
    sd["model.layers.1.mlp.up_proj.W_q"] = torch.zeros(4, 64, dtype=torch.uint8)
    save_file(sd, str(f), metadata={"format": "pt"})
    for load in (polyquant.load, load_model):
        with pytest.raises(ValueError, match=r"up_proj\.W_q.*hqq per-layer tensors.*no quantization_config"):
            load(folder)
