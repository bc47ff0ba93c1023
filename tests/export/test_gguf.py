"""GGUF export: blocks decode (with gguf's own dequantizer) to polyquant's weights, transformers' GGUF
loader runs the file with our logits, the tokenizer round-trips, refusals name the layer, writes are atomic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import polyquant
from polyquant.export import ExportError, export
from polyquant.export.gguf import gguf_blocks, llama_permutation
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import replace_module
from polyquant.tensor import QuantizedWeight
VOCAB = 320  # tests/export/conftest.py: the BPE tokenizer's vocab size
from helpers import tiny_llama

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType


def _fp16_scales(model):
    """Round every quantized layer's scales (and zeros) to fp16 values: GGUF's d is fp16, so only then
    can the stored blocks equal polyquant's dequantized weight bit for bit."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qw_scale.copy_(m.qw_scale.half().float())
            m.set_kernel("reference")  # the ground truth: dequantize + float32 matmul
    return model


def _quantized(cfg, seed=0, hidden=64):
    m = tiny_llama(seed=seed, hidden=hidden, vocab=VOCAB)
    return _fp16_scales(polyquant.quantize(m, cfg, show_progress=False))


def _weight(cfg, shape=(48, 128), seed=0):
    from polyquant.methods import get_method
    torch.manual_seed(seed)
    w = torch.randn(*shape)
    qw = get_method(cfg.method).quantize_weight(w, cfg, None)
    qw.scale = qw.scale.half().float()
    return qw


@pytest.mark.parametrize("cfg,gtype", [
    (polyquant.RTNConfig(bits=4, group_size=32), "Q4_0"),
    (polyquant.RTNConfig(bits=4, group_size=64), "Q4_0"),      # a group of 64 = two Q4_0 blocks
    (polyquant.RTNConfig(bits=4, group_size=-1), "Q4_0"),      # per channel
    (polyquant.RTNConfig(bits=3, group_size=32), "Q4_0"),      # int3 codes re-centred on 8
    (polyquant.RTNConfig(bits=8, group_size=-1), "Q8_0"),
    (polyquant.RTNConfig(bits=4, group_size=128), "Q8_0"),     # int4 values fit int8
    (polyquant.RTNConfig(bits=4, group_size=64, sym=False), "Q8_0"),  # integer zero points
])
def test_blocks_decode_exactly_with_ggufs_dequantizer(cfg, gtype):
    qw = _weight(cfg)
    data, why = gguf_blocks(qw, gtype)
    assert why is None
    assert data.shape == (48, 128 // 32 * {"Q4_0": 18, "Q8_0": 34}[gtype])
    got = torch.from_numpy(gguf.quants.dequantize(data, GT[gtype]))
    assert torch.equal(got, qw.dequantize())


def test_q4_1_decodes_to_our_grid_up_to_the_fp16_offset():
    qw = _weight(polyquant.RTNConfig(bits=4, group_size=32, sym=False))
    data, why = gguf_blocks(qw, "Q4_1")
    assert why is None and data.shape == (48, 4 * 20)
    got = torch.from_numpy(gguf.quants.dequantize(data, GT.Q4_1)).double()
    # the block's definition: d q + m with d = scale, m = -zero * scale, both fp16
    d = qw.full_scale().double()
    m16 = (-qw.full_zero().double() * d).half().double()
    assert torch.allclose(got, d * qw.codes.double() + m16, rtol=0, atol=1e-6 * float(d.max()))
    ours = qw.dequantize().double()
    bound = (m16 - (-qw.full_zero().double() * d)).abs() + 1e-6 * float(d.max())
    assert ((got - ours).abs() <= bound).all()
    assert (got - ours).abs().max() > 0  # the fp16 rounding of m is real ...
    assert (got - ours).abs().max() < 2e-3 * float(d.max()) * 16  # ... and small


def test_q4_0_refuses_asymmetric_and_codebook_grids():
    asym = _weight(polyquant.RTNConfig(bits=4, group_size=32, sym=False))
    data, why = gguf_blocks(asym, "Q4_0")
    assert data is None and "zero points" in why
    g48 = _weight(polyquant.RTNConfig(bits=4, group_size=48), shape=(16, 96))
    data, why = gguf_blocks(g48, "Q4_0")
    assert data is None and "group size 48" in why


def test_llama_permutation_matches_llama_cpp_converter():
    # llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2).reshape(w.shape)
    w = torch.arange(16 * 3).reshape(16, 3)
    ref = w.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)
    assert torch.equal(w[llama_permutation(16, 2)], ref)


@pytest.mark.parametrize("cfg,gtype", [
    (polyquant.RTNConfig(bits=4, group_size=32), "Q4_0"),
    (polyquant.RTNConfig(bits=4, group_size=32, sym=False), "Q4_1"),
    (polyquant.RTNConfig(bits=8, group_size=-1), "Q8_0"),
])
def test_transformers_gguf_loader_gives_our_logits(tmp_path, bpe, cfg, gtype):
    from transformers import AutoModelForCausalLM
    q = _quantized(cfg)
    r = export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, float_type="F32", type=gtype)
    qinfo = {n: i for n, i in r.layers.items() if i["source"] != "float"}
    assert len(qinfo) == 14 and all(i["source"] == "codes" and i["type"] == gtype for i in qinfo.values())
    if gtype != "Q4_1":
        assert all(i["exact"] for i in qinfo.values())  # every block decodes to our weight bit for bit
    else:
        assert max(i["max_abs_err"] for i in qinfo.values()) < 1e-3
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    x = torch.tensor([bpe.encode("the quick brown fox jumps over the lazy dog. perplexity measures")])
    with torch.no_grad():
        ours, theirs = q(x).logits, g(x).logits
    # stated tolerance: same weights, float32 matmuls in a different order (Q4_1: plus fp16 offsets)
    tol = 2e-3 if gtype == "Q4_1" else 1e-4
    assert (ours - theirs).abs().max() < tol * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_tokenizer_metadata_round_trips(tmp_path, bpe, bpe_dir):
    import json
    from transformers import AutoTokenizer
    q = _quantized(polyquant.RTNConfig(bits=4, group_size=32))
    export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, tokenizer_pre="smollm")
    rd = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    f = rd.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = f["tokenizer.ggml.tokens"].contents()
    vocab = bpe.get_vocab()
    assert len(tokens) == VOCAB
    assert all(tokens[i] == t for t, i in vocab.items())
    assert all(tokens[i] == f"[PAD{i}]" for i in range(len(vocab), VOCAB))  # ids the tokenizer lacks
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["the"]] == gguf.TokenType.NORMAL
    assert types[VOCAB - 1] == gguf.TokenType.UNUSED
    merges = json.loads((Path(bpe_dir) / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"].contents() == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert f["tokenizer.ggml.bos_token_id"].contents() == bpe.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"].contents() == bpe.eos_token_id
    assert f["llama.attention.head_count_kv"].contents() == 2 and f["llama.block_count"].contents() == 2
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the lazy dog jumps; quantization keeps weights small."
    assert tok2.encode(text, add_special_tokens=False) == bpe.encode(text, add_special_tokens=False)


def _act_order_model():
    q = _quantized(polyquant.RTNConfig(bits=4, group_size=32))
    name = "model.layers.1.mlp.down_proj"
    layer = q.get_submodule(name)
    qw = layer.quantized_weight
    g = torch.arange(qw.shape[1]) // 32
    g_idx = g[torch.randperm(qw.shape[1], generator=torch.Generator().manual_seed(0))]
    qw2 = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, g_idx.to(torch.int32))
    replace_module(q, name, QuantLinear(qw2, kernel="reference"))
    return q, name


def test_act_order_is_refused_by_layer_name(tmp_path, bpe):
    q, name = _act_order_model()
    with pytest.raises(ExportError, match=rf"{name}: act-order"):
        export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, type="Q4_0")
    assert not (tmp_path / "m.gguf").exists()


def test_a_grid_the_type_cannot_hold_is_refused_or_requantized_with_its_loss(tmp_path, bpe):
    from polyquant.methods.bnb import BnbNF4Config
    q = polyquant.quantize(tiny_llama(vocab=VOCAB), BnbNF4Config(), show_progress=False)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: cannot be stored as Q4_0 "
                                          r"without re-rounding: qtype nf4"):
        export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, type="Q4_0", requantize=False)
    r = export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, type="Q4_0")
    info = r.layers["model.layers.0.self_attn.q_proj"]
    assert info["source"] == "requantized" and "nf4" in info["reason"]
    assert 0 < info["max_abs_err"] and 5 < info["sqnr_db"] < 40  # re-rounding NF4 onto Q4_0 loses something


def test_other_architectures_are_refused(tmp_path, bpe):
    from helpers import tiny_bert
    with pytest.raises(ExportError, match="model_type 'bert'"):
        export(tiny_bert(), "gguf", tmp_path / "m.gguf", tokenizer=bpe)


def test_interrupted_export_leaves_no_file(tmp_path, bpe, monkeypatch):
    q = _quantized(polyquant.RTNConfig(bits=4, group_size=32))
    out = tmp_path / "m.gguf"
    real = gguf.GGUFWriter.write_tensors_to_file
    calls = {"n": 0}

    def half_way(self, *a, **k):  # write part of the tensors, then the user presses Ctrl-C
        self.fout[0].write(b"\0" * 4096)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_way)
    with pytest.raises(KeyboardInterrupt):
        export(q, "gguf", out, tokenizer=bpe)
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        export(q, "gguf", out, tokenizer=bpe, overwrite=True)
    assert out.read_bytes() == b"old" and list(tmp_path.iterdir()) == [out]
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)
    with pytest.raises(FileExistsError):
        export(q, "gguf", out, tokenizer=bpe)
    export(q, "gguf", out, tokenizer=bpe, overwrite=True)
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"


def test_float_model_is_quantized_by_ggufs_reference_quantizer(tmp_path, bpe):
    m = tiny_llama(vocab=VOCAB)
    r = export(m, "gguf", tmp_path / "m.gguf", tokenizer=bpe, type="Q4_0")
    info = r.layers["model.layers.0.mlp.up_proj"]
    assert info["source"] == "requantized" and info["type"] == "Q4_0"
    w = m.model.layers[0].mlp.up_proj.weight.detach().numpy()
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, GT.Q4_0), GT.Q4_0)
    assert info["max_abs_err"] == pytest.approx(float(np.abs(ref - w).max()))


def test_check_layer_for_the_compatibility_matrix():
    from polyquant.export import list_exporters
    exps = list_exporters()
    assert set(exps) == {"gguf", "onnx"}
    sym = _weight(polyquant.RTNConfig(bits=4, group_size=64))
    asym = _weight(polyquant.RTNConfig(bits=4, group_size=32, sym=False))
    assert exps["gguf"].check_layer(sym) is None and exps["gguf"].check_layer(asym) is None
    assert exps["onnx"].check_layer(sym) is None
    g48 = _weight(polyquant.RTNConfig(bits=4, group_size=48), shape=(16, 96))
    assert "group size 48" in exps["gguf"].check_layer(g48)
    assert "group size 48" in exps["onnx"].check_layer(g48)


def test_qwen2_with_attention_biases_reads_back(tmp_path, bpe):
    from transformers import AutoModelForCausalLM
    from helpers import tiny_qwen2
    q = _fp16_scales(polyquant.quantize(tiny_qwen2(vocab=VOCAB), polyquant.RTNConfig(bits=4, group_size=32),
                                        show_progress=False))
    r = export(q, "gguf", tmp_path / "q.gguf", tokenizer=bpe, float_type="F32", type="Q4_0")
    assert r.extra["architecture"] == "qwen2"
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors]
    assert "blk.0.attn_q.bias" in names and ("output.weight" in names) == (not q.config.tie_word_embeddings)
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    x = torch.tensor([bpe.encode("the quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        ours, theirs = q(x).logits, g(x).logits
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()


def test_tensors_are_written_in_llama_quantizes_order(tmp_path, bpe):
    """llama.cpp's weight_name_comparer: non-block tensors first, then blocks numerically (blk.2 before
    blk.10), names sorted within a block; llama-quantize writes this order and decodes it fastest."""
    from polyquant.export.gguf import llama_tensor_order
    m = tiny_llama(seed=0, hidden=64, vocab=VOCAB, layers=11)
    q = _fp16_scales(polyquant.quantize(m, polyquant.RTNConfig(bits=4, group_size=32), show_progress=False))
    export(q, "gguf", tmp_path / "m.gguf", tokenizer=bpe, float_type="F32", type="Q4_0")
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors]
    assert names == sorted(names, key=llama_tensor_order)
    assert names[:2] == ["output_norm.weight", "token_embd.weight"] or names[:3] == [
        "output.weight", "output_norm.weight", "token_embd.weight"]
    blocks = [int(n.split(".")[1]) for n in names if n.startswith("blk.")]
    assert blocks == sorted(blocks) and blocks[-1] == 10
    assert [n for n in names if n.startswith("blk.2.")] == [
        "blk.2.attn_k.weight", "blk.2.attn_norm.weight", "blk.2.attn_output.weight", "blk.2.attn_q.weight",
        "blk.2.attn_v.weight", "blk.2.ffn_down.weight", "blk.2.ffn_gate.weight", "blk.2.ffn_norm.weight",
        "blk.2.ffn_up.weight"]


def _ternary_weight(shape=(8, 512), granularity="tensor", seed=0):
    from polyquant.methods.bitnet import BitNetConfig, bitnet_quantize
    torch.manual_seed(seed)
    qw = bitnet_quantize(torch.randn(*shape), BitNetConfig(granularity=granularity), None)
    qw.scale = qw.scale.half().float()
    return qw


@pytest.mark.parametrize("gtype", ["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_blocks_are_ggufs_own_bytes_and_decode_exactly(gtype, granularity):
    """Our TQ packing from BitNet's codes equals gguf-py's reference quantizer byte for byte on the
    dequantized weight (d = the block's absmax = our scale), and decodes back to it exactly."""
    qw = _ternary_weight(granularity=granularity)
    data, why = gguf_blocks(qw, gtype)
    assert why is None
    ref = qw.dequantize().numpy()
    assert data.shape == (8, 512 // 256 * (66 if gtype == "TQ2_0" else 54))
    assert np.array_equal(data, gguf.quants.quantize(ref, GT[gtype]))
    np.testing.assert_array_equal(gguf.quants.dequantize(data, GT[gtype]), ref)


def test_every_ternary_position_survives_tq1_0():
    """All 3^5 trit patterns in every byte slot (a wrong power or order of trits fails)."""
    from polyquant.export.gguf import pack_tq1_0, pack_tq2_0
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, size=(243, 256)).astype(np.uint8)
    t[:, :5] = np.array(np.unravel_index(np.arange(243), (3,) * 5)).T  # every pattern in the first byte
    d = np.ones((243, 1), np.float32)
    for pack, gt in ((pack_tq1_0, "TQ1_0"), (pack_tq2_0, "TQ2_0")):
        np.testing.assert_array_equal(gguf.quants.dequantize(pack(t, d), GT[gt]), t.astype(np.float32) - 1)


def test_ternary_type_choice_and_refusals():
    from polyquant.export.gguf_blocks import gguf_check_layer, natural_type
    assert natural_type(_ternary_weight((8, 512))) == "TQ2_0"
    narrow = _ternary_weight((8, 576))               # SmolLM's width: not a multiple of 256
    assert gguf_blocks(narrow, "TQ2_0")[1] == "in_features 576 is not a multiple of the ternary types' 256-weight blocks"
    assert natural_type(narrow) == "Q4_0" and gguf_check_layer(narrow) is None
    data, _ = gguf_blocks(narrow, "Q4_0")            # codes 0, 1, 2 -> Q4_0's 7, 8, 9 exactly
    np.testing.assert_array_equal(gguf.quants.dequantize(data, GT.Q4_0), narrow.dequantize().numpy())
    int4 = _weight(polyquant.RTNConfig(bits=4, group_size=32), shape=(8, 512))
    assert "not ternary" in gguf_blocks(int4, "TQ2_0")[1]


def test_bitnet_model_in_tq2_0_loads_in_transformers_with_our_weights(tmp_path, bpe):
    from transformers import AutoModelForCausalLM
    m = tiny_llama(seed=0, hidden=256, vocab=VOCAB)
    from polyquant.methods.bitnet import BitNetConfig
    q = polyquant.quantize(m, BitNetConfig(), show_progress=False)
    for mod in q.modules():
        if isinstance(mod, QuantLinear):
            mod.qw_scale.copy_(mod.qw_scale.half().float())
    r = export(q, "gguf", tmp_path / "b.gguf", tokenizer=bpe, float_type="F32")
    types = {v["type"] for v in r.layers.values() if v.get("source") == "codes"}
    assert types == {"TQ2_0"} and r.extra["file_type"] == "TQ2_0"
    assert r.extra["activation_rules_not_carried"] == 14  # BitNet's int8 rule: llama.cpp uses its own
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="b.gguf", dtype=torch.float32).eval()
    sd = g.state_dict()
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            torch.testing.assert_close(sd[name + ".weight"], mod.quantized_weight.dequantize(), rtol=0, atol=0)


def test_float_layers_too_narrow_for_tq_are_refused_before_writing(tmp_path, bpe):
    m = tiny_llama(seed=0, hidden=64, vocab=VOCAB)
    with pytest.raises(ExportError, match="not a multiple of TQ2_0's 256-weight blocks"):
        export(m, "gguf", tmp_path / "f.gguf", tokenizer=bpe, float_type="F32", type="TQ2_0")
    assert not (tmp_path / "f.gguf").exists()


def test_cli_gguf_types_are_the_exporters():
    from polyquant.cli.commands.export import _GGUF_TYPES
    from polyquant.export.gguf import GGUF_TYPES
    assert _GGUF_TYPES == ("auto",) + GGUF_TYPES
