"""``polyquant export`` and ``polyquant eval OUT.onnx`` on a tiny saved checkpoint."""
from __future__ import annotations

import json

import pytest

import polyquant
from helpers import tiny_llama, run_cli as run

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("ckpt") / "rtn"
    q = polyquant.quantize(tiny_llama(vocab=VOCAB), polyquant.RTNConfig(bits=4, group_size=32), show_progress=False)
    polyquant.save(q, d, tokenizer=bpe)
    return d


def test_export_gguf_and_onnx_then_eval_onnx(tmp_path, capsys, ckpt, text_file):
    import gguf
    code, out, err = run(capsys, "export", ckpt, "--to", "gguf", "--type", "Q4_0", "-o", tmp_path / "m.gguf", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["layers"] == {"F16:float": 1, "F32:float": 5, "Q4_0:codes": 14}
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    code, out, err = run(capsys, "export", ckpt, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert code == 2 and "exists" in err
    code, out, err = run(capsys, "export", ckpt, "--to", "onnx", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert "MatMulNBits4:codes" in out
    code, out, err = run(capsys, "eval", tmp_path / "m.onnx", "--text", text_file, "--max-windows", "2",
                         "--seqlen", "32", "--decode-tokens", "4", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["runtime"] == "onnxruntime" and res["windows"] == 2 and res["ppl"] > 1 and res["decode_tok_s"] > 0


def test_export_refusal_names_the_layer(tmp_path, capsys, bpe):
    from polyquant.methods.bnb import BnbNF4Config
    d = tmp_path / "nf4"
    polyquant.save(polyquant.quantize(tiny_llama(vocab=VOCAB), BnbNF4Config(), show_progress=False), d, tokenizer=bpe)
    code, out, err = run(capsys, "export", d, "--to", "onnx", "-o", tmp_path / "m.onnx")
    assert code == 2 and "model.layers.0.self_attn.q_proj: qtype nf4" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. quantization keeps the weights small. " * 30)
    return p
