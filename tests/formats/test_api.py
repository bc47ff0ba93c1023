"""Generic save / load / detect_format / checkpoint_info: atomic writes, clear errors for bad
folders, tied embeddings, tokenizer, sharding, and what is read without building a model."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyquant
from helpers import tiny_llama, tiny_tokenizer_dir
from polyquant.formats import CheckpointError, checkpoint_info, detect_format, load, save

X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def qmodel(llama):
    return polyquant.quantize(llama, polyquant.RTNConfig(bits=4, group_size=32, sym=True), show_progress=False)


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    return save(qmodel, tmp_path_factory.mktemp("ck") / "w4")


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def _edit_tensors(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


# -- bad input -----------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    assert issubclass(CheckpointError, ValueError)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json: not a Hugging Face model folder"):
        load(tmp_path)


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(copy)


def test_pickle_only_folder_is_refused(copy):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights.*pytorch_model\.bin.*never loads pickle"):
        load(copy)


def test_truncated_safetensors(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(copy)
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint_info(copy)


def test_corrupt_header(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"#" * n + data[8 + n:])
    with pytest.raises(CheckpointError, match="corrupt"):
        load(copy)


def test_unknown_quant_method(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "magic-quant", "bits": 4}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown quant_method 'magic-quant'.*compressed-tensors"):
        load(copy)
    with pytest.raises(CheckpointError, match="magic-quant"):
        detect_format(copy)
    assert checkpoint_info(copy)["readable"] is False


def test_missing_and_extra_and_misshapen_tensors(saved, tmp_path):
    cases = {
        "missing-float": (lambda sd: sd.pop("model.norm.weight"), r"missing tensor\(s\) \['model\.norm\.weight'\]"),
        "missing-quant": (lambda sd: sd.pop(f"{Q}.weight_scale"), rf"'{Q}'.*missing tensor\(s\) \['weight_scale'\]"),
        "extra": (lambda sd: sd.__setitem__("model.layers.0.surprise", torch.zeros(3)),
                  r"does not have: \['model\.layers\.0\.surprise'\]"),
        "extra-quant": (lambda sd: sd.__setitem__(f"{Q}.weight_global_scale", torch.ones(1)),
                        rf"'{Q}'.*unexpected tensor\(s\) \['weight_global_scale'\]"),
        "shape": (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)),
                  r"'model\.norm\.weight' has shape \[65\].*expects \[64\]"),
        "qshape": (lambda sd: sd.__setitem__(f"{Q}.weight_scale", torch.ones(64, 3)),
                   rf"'{Q}'.*weight_scale has shape \[64, 3\].*needs \[64, 2\]"),
    }
    for name, (edit, pattern) in cases.items():
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        _edit_tensors(folder, edit)
        with pytest.raises(CheckpointError, match=pattern):
            load(folder)


# -- atomic saves ---------------------------------------------------------------------------------
def test_existing_output_without_overwrite(qmodel, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(qmodel, out)
    assert _entries(tmp_path) == ["out"] and _entries(out) == ["config.json"]


def test_overwrite_swaps_in_complete_folder(qmodel, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    save(qmodel, out, overwrite=True)
    assert _entries(tmp_path) == ["out"]
    assert "stale.txt" not in _entries(out)
    assert {"config.json", "model.safetensors", "polyquant.json"} <= set(_entries(out))
    # a folder that is not a model folder is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model folder"):
        save(qmodel, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


class _BrokenTokenizer:
    def save_pretrained(self, path):
        (__import__("pathlib").Path(path) / "tokenizer.json").write_text("{")
        raise OSError("disk full (simulated)")


def test_failure_mid_way_leaves_nothing(qmodel, tmp_path):
    with pytest.raises(OSError, match="simulated"):
        save(qmodel, tmp_path / "out", tokenizer=_BrokenTokenizer())
    assert _entries(tmp_path) == []
    # with overwrite: the old folder survives untouched
    good = save(qmodel, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(OSError, match="simulated"):
        save(qmodel, good, tokenizer=_BrokenTokenizer(), overwrite=True)
    assert _entries(tmp_path) == ["out"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_refusals_before_writing(llama, tmp_path):
    with pytest.raises(ValueError, match="model.polyquant is missing"):
        save(llama, tmp_path / "float")
    q = polyquant.quantize(llama, polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        save(q, tmp_path / "x", format="nope")
    assert _entries(tmp_path) == []


def test_save_does_not_modify_the_model(qmodel, tmp_path):
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    cfg_before = qmodel.config.to_dict()
    rec_before = (qmodel.polyquant.method, dict(qmodel.polyquant.config), list(qmodel.polyquant.modules))
    save(qmodel, tmp_path / "a")
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert qmodel.config.to_dict() == cfg_before and "quantization_config" not in cfg_before
    assert (qmodel.polyquant.method, qmodel.polyquant.config, qmodel.polyquant.modules) == rec_before


# -- contents -------------------------------------------------------------------------------------
def test_tokenizer_generation_config_and_record(qmodel, tmp_path):
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = save(qmodel, tmp_path / "m", tokenizer=tok)
    assert (path / "generation_config.json").is_file()
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    rec = json.loads((path / "polyquant.json").read_text())
    assert rec["method"] == "rtn" and rec["config"]["group_size"] == 32 and len(rec["modules"]) == 14
    m2, tok2 = load(path)
    assert tok2 is not None and tok2("w1 w2 w3")["input_ids"] == tok("w1 w2 w3")["input_ids"]
    assert m2.generation_config.eos_token_id == 2
    assert m2.config.tie_word_embeddings and m2.lm_head.weight is m2.model.embed_tokens.weight


def test_quantized_lm_head_unties(llama, tmp_path):
    q = polyquant.quantize(llama, polyquant.RTNConfig(bits=8, group_size=-1, quantize_lm_head=True),
                           show_progress=False)
    path = save(q, tmp_path / "head")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["ignore"] == []
    sd = load_file(path / "model.safetensors")
    assert "lm_head.weight_packed" in sd and "model.embed_tokens.weight" in sd and "lm_head.weight" not in sd
    q2, _ = load(path)
    assert torch.equal(q2(X).logits, q(X).logits)
    assert torch.equal(q2.model.embed_tokens.weight, llama.model.embed_tokens.weight)
    cfg["tie_word_embeddings"] = True  # a foreign config that still claims a tied (but quantized) head
    (path / "config.json").write_text(json.dumps(cfg))
    q3, _ = load(path)
    assert torch.equal(q3(X).logits, q(X).logits) and q3.config.tie_word_embeddings is False


def test_sharded_checkpoint(qmodel, tmp_path):
    path = save(qmodel, tmp_path / "sh", max_shard_size=20_000)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    q2, _ = load(path)
    assert torch.equal(q2(X).logits, qmodel(X).logits)
    assert checkpoint_info(path)["quantized_layers"] == 14


def test_load_dtype_and_float_folder(llama, qmodel, saved, tmp_path):
    q2, _ = load(saved, dtype=torch.bfloat16)
    assert q2.model.norm.weight.dtype == torch.bfloat16 and q2.model.embed_tokens.weight.dtype == torch.bfloat16
    assert q2.get_submodule(Q).quantized_weight.scale.dtype == torch.float32  # stored dtype kept
    llama.save_pretrained(str(tmp_path / "float"))
    assert detect_format(tmp_path / "float") is None
    f, _ = load(tmp_path / "float")
    assert getattr(f, "polyquant", None) is None
    assert torch.equal(f(X).logits, llama(X).logits)


# -- info -----------------------------------------------------------------------------------------
def test_checkpoint_info_numbers(saved):
    info = checkpoint_info(saved)
    assert detect_format(saved) == "compressed-tensors"
    assert {k: info[k] for k in ("format", "quant_method", "method", "bits", "group_size", "sym")} == {
        "format": "compressed-tensors", "quant_method": "compressed-tensors", "method": "rtn",
        "bits": 4, "group_size": 32, "sym": True}
    assert info["quantized_layers"] == 14 and info["layer_names"][0] == "model.layers.0.mlp.down_proj"
    # per block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128 -> 36864 weights; 2 blocks
    weights = 2 * 36864
    assert info["bytes_by_kind"]["codes"] == weights // 2  # 4 bits
    assert info["bytes_by_kind"]["scales"] == (weights // 32) * 4  # one fp32 scale per 32 weights
    assert info["bytes_by_kind"]["zeros"] == 0
    assert info["bytes_by_kind"]["other_quantized"] == 14 * 16  # weight_shape: int64 [2]
    # embed 256x64 + 5 norms of 64 (tied lm_head stored once)
    assert info["float_params"] == 256 * 64 + 5 * 64 and info["bytes_by_kind"]["float"] == 4 * info["float_params"]
    assert info["bytes_total"] == (saved / "model.safetensors").stat().st_size
    assert info["written_by"].startswith("polyquant ")


def test_checkpoint_info_foreign_and_float(saved, tmp_path, llama):
    foreign = tmp_path / "foreign"
    shutil.copytree(saved, foreign)
    (foreign / "polyquant.json").unlink()
    _edit_tensors(foreign, lambda sd: None)  # rewrites without polyquant metadata
    info = checkpoint_info(foreign)
    assert info["written_by"] == "foreign (compressed-tensors 0.20.0)" and info["method"] == "compressed-tensors"
    q2, _ = load(foreign)
    assert q2.polyquant.method == "compressed-tensors" and q2.polyquant.extra["written_by"].startswith("foreign")
    llama.save_pretrained(str(tmp_path / "float"))
    fi = checkpoint_info(tmp_path / "float")
    assert fi["format"] is None and fi["quantized_layers"] == 0 and fi["written_by"] == "foreign"
