"""ONNX export: MatMulNBits layers give the reference kernel's output in onnxruntime, the exported
decoder (KV cache) gives polyquant's logits, layouts MatMulNBits cannot hold are refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import polyquant
from polyquant.methods.bitnet import BitNetConfig
from polyquant.export import ExportError, export
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import replace_module
from polyquant.tensor import QuantizedWeight
from helpers import tiny_llama

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from polyquant.export.onnx import IR_VERSION, feeds, matmulnbits_tensors  # noqa: E402

VOCAB = 320


def _session(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _one_layer_graph(qw):
    """A graph of the one MatMulNBits node (and its Gather for act-order) the exporter puts in."""
    from onnx import TensorProto, helper, numpy_helper
    t = matmulnbits_tensors(qw)
    inits = [numpy_helper.from_array(t["B"], "B"), numpy_helper.from_array(t["scales"], "S")]
    nodes, a = [], "A"
    if "perm" in t:
        inits.append(numpy_helper.from_array(t["perm"], "P"))
        nodes.append(helper.make_node("Gather", ["A", "P"], ["AP"], axis=-1))
        a = "AP"
    ins = [a, "B", "S"]
    if "zero_points" in t:
        inits.append(numpy_helper.from_array(t["zero_points"], "Z"))
        ins.append("Z")
    if "g_idx" in t:
        ins += ([] if "zero_points" in t else [""]) + ["G"]
        inits.append(numpy_helper.from_array(t["g_idx"], "G"))
    nodes.append(helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", accuracy_level=0, **t["attrs"]))
    n, k = qw.shape
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = IR_VERSION
    return m.SerializeToString(), t


def _qw(cfg, shape=(48, 128), act_order=False, seed=0):
    from polyquant.methods import get_method
    torch.manual_seed(seed)
    qw = get_method(cfg.method).quantize_weight(torch.randn(*shape), cfg, None)
    if act_order:  # the same codes with their groups scattered over the columns (as GPTQ's desc_act)
        g = torch.arange(shape[1]) // qw.block[1]
        g_idx = g[torch.randperm(shape[1], generator=torch.Generator().manual_seed(1))].to(torch.int32)
        qw = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, qw.zero, g_idx)
    return qw


@pytest.mark.parametrize("cfg,act_order,route", [
    (polyquant.RTNConfig(bits=4, group_size=32), False, None),
    (polyquant.RTNConfig(bits=4, group_size=16, sym=False), False, None),
    (polyquant.RTNConfig(bits=4, group_size=-1), False, None),             # per channel: repeated scales
    (polyquant.RTNConfig(bits=8, group_size=-1), False, None),             # int8 per channel
    (polyquant.RTNConfig(bits=2, group_size=32, sym=False), False, None),
    (polyquant.RTNConfig(bits=4, group_size=32), True, "g_idx"),           # act-order: onnxruntime's g_idx
    (polyquant.RTNConfig(bits=4, group_size=32, sym=False), True, "perm"),  # act-order with zeros: gather
    (BitNetConfig(), False, None),                                          # ternary, one scale: 2-bit, zp 1
    (BitNetConfig(granularity="channel"), False, None),
    (BitNetConfig(granularity="group", group_size=32), False, None),
])
def test_matmulnbits_layer_matches_the_reference_kernel(cfg, act_order, route):
    qw = _qw(cfg, act_order=act_order)
    data, t = _one_layer_graph(qw)
    assert ("g_idx" in t, "perm" in t) == (route == "g_idx", route == "perm")
    x = torch.randn(5, 128)
    ref = QuantLinear(qw, kernel="reference")(x).detach().numpy()
    got = _session(data).run(None, {"A": x.numpy()})[0]
    # stated tolerance: the same weights, float32 accumulation in another order
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_last_partial_group_is_padded():
    qw = _qw(polyquant.RTNConfig(bits=4, group_size=32, sym=False), shape=(16, 100))
    data, _ = _one_layer_graph(qw)
    x = torch.randn(3, 100)
    ref = QuantLinear(qw, kernel="reference")(x).detach().numpy()
    assert np.abs(_session(data).run(None, {"A": x.numpy()})[0] - ref).max() <= 1e-5 * np.abs(ref).max()


def _model(cfg, seed=0):
    return polyquant.quantize(tiny_llama(seed=seed, vocab=VOCAB), cfg, show_progress=False, kernel="reference")


@pytest.mark.parametrize("cfg", [polyquant.RTNConfig(bits=4, group_size=32, sym=False),
                                 polyquant.RTNConfig(bits=8, group_size=-1)])
def test_exported_decoder_gives_polyquants_logits_with_kv_cache(tmp_path, bpe, cfg):
    q = _model(cfg)
    out = tmp_path / "m.onnx"
    r = export(q, "onnx", out, tokenizer=bpe)
    assert len(r.layers) == 14 and all(i["type"] == f"MatMulNBits{cfg.bits}" for i in r.layers.values())
    proto = onnx.load(str(out))
    assert proto.ir_version == IR_VERSION
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 14
    sess = _session(str(out))
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ref = q(ids).logits.numpy()
    full = sess.run(["logits"], feeds(q.config, ids.numpy()))[0]
    assert np.abs(full - ref).max() <= 1e-5 * np.abs(ref).max()
    # prefill 6 tokens, then decode one at a time through the cache outputs
    o = sess.run(None, feeds(q.config, ids[:, :6].numpy()))
    steps = [o[0]]
    for j in range(6, 10):
        o = sess.run(None, feeds(q.config, ids[:, j:j + 1].numpy(), o[1:], j))
        steps.append(o[0])
    assert np.abs(np.concatenate(steps, 1) - ref).max() <= 1e-5 * np.abs(ref).max()
    assert (tmp_path / "m.onnx.tokenizer" / "config.json").is_file()


def test_act_order_model_exports_exactly(tmp_path):
    q = _model(polyquant.RTNConfig(bits=4, group_size=32, sym=False))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        qw = q.get_submodule(name).quantized_weight
        g = torch.arange(qw.shape[1]) // 32
        g_idx = g[torch.randperm(qw.shape[1], generator=torch.Generator().manual_seed(2))].to(torch.int32)
        replace_module(q, name, QuantLinear(QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale,
                                                            qw.zero, g_idx), kernel="reference"))
    r = export(q, "onnx", tmp_path / "m.onnx", tokenizer_dir=False)
    assert r.layers["model.layers.1.mlp.down_proj"]["act_order"] == "gather"
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        ref = q(ids).logits.numpy()
    got = _session(str(tmp_path / "m.onnx")).run(["logits"], feeds(q.config, ids.numpy()))[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_layouts_matmulnbits_cannot_hold_are_refused_by_name(tmp_path):
    from polyquant.methods.bnb import BnbNF4Config
    from polyquant.methods.hqq import HQQConfig
    cases = [(polyquant.RTNConfig(bits=4, group_size=48), "group size 48 is not a power of two >= 16"),
             (polyquant.RTNConfig(bits=3, group_size=32), "3-bit codes"),
             (BnbNF4Config(), "qtype nf4"),
             (HQQConfig(bits=4, group_size=32), "non-integer zero points")]
    for cfg, why in cases:
        m = tiny_llama(vocab=VOCAB, hidden=96) if cfg.method == "rtn" and cfg.group_size == 48 else tiny_llama(vocab=VOCAB)
        q = polyquant.quantize(m, cfg, show_progress=False, kernel="reference")
        with pytest.raises(ExportError, match=rf"model\.layers\.0\.self_attn\.q_proj: .*{why}"):
            export(q, "onnx", tmp_path / "m.onnx")
        assert not (tmp_path / "m.onnx").exists()


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    import polyquant.export.onnx as mod
    q = _model(polyquant.RTNConfig(bits=4, group_size=32))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "_swap_matmuls", boom)
    with pytest.raises(KeyboardInterrupt):
        export(q, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_runtime_model_scores_and_decodes_like_polyquant(tmp_path, bpe):
    from polyquant.eval.perplexity import score_windows
    from polyquant.eval.speed import greedy_decode
    from polyquant.export.onnx import OnnxCausalLM
    q = _model(polyquant.RTNConfig(bits=4, group_size=32))
    export(q, "onnx", tmp_path / "m.onnx", tokenizer=bpe, verify=False)
    om = OnnxCausalLM(tmp_path / "m.onnx")  # config from m.onnx.tokenizer/
    assert om.config.num_hidden_layers == 2
    windows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))
    ours = score_windows(q, windows, show_progress=False)["ppl"]
    theirs = score_windows(om, windows, show_progress=False)["ppl"]
    assert abs(theirs / ours - 1) < 1e-5
    prompt = windows[0, :5]
    toks, _ = om.greedy(prompt, 6)
    ref, _ = greedy_decode(q, prompt.reshape(1, -1), 6)
    assert toks == ref.tolist()


def _float_mats(path):
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if len(i.dims) == 2 and i.data_type == 1}


def _folded_transposes(path, tmp_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding, portable
    so.optimized_model_filepath = str(tmp_path / (path.name + ".opt"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Transpose" for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_tied_lm_head_is_stored_once_with_unchanged_logits(tmp_path):
    q = _model(polyquant.RTNConfig(bits=4, group_size=32))
    assert q.config.tie_word_embeddings and q.lm_head.weight is q.model.embed_tokens.weight
    two, one = tmp_path / "two.onnx", tmp_path / "one.onnx"
    export(q, "onnx", two, tokenizer_dir=False, share_weights=False)
    r = export(q, "onnx", one, tokenizer_dir=False)
    emb = q.model.embed_tokens.weight.detach().numpy()
    # before: the embedding and the exporter's folded E^T for the lm_head MatMul; after: E alone
    before = _float_mats(two)
    assert sorted(a.shape for a in before.values()) == sorted([emb.shape, emb.shape[::-1]])
    after = _float_mats(one)
    assert list(after.values())[0].shape == emb.shape and len(after) == 1
    assert np.array_equal(list(after.values())[0], emb)
    assert r.extra["shared_initializers"] == [{"name": next(n for n, a in before.items() if a.shape == emb.shape[::-1]),
                                               "kept": next(iter(after)), "how": "transpose", "bytes": emb.nbytes}]
    assert two.stat().st_size - one.stat().st_size >= emb.nbytes - 512 and r.extra["shared_bytes"] == emb.nbytes
    # onnxruntime folds the one Transpose when the session is made: same MatMul, identical logits
    assert _folded_transposes(one, tmp_path) == _folded_transposes(two, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5)).numpy()
    a, b = (_session(str(p)).run(["logits"], feeds(q.config, ids))[0] for p in (two, one))
    assert np.array_equal(a, b)
    with torch.no_grad():
        ref = q(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(b - ref).max() <= 1e-5 * np.abs(ref).max()


def test_untied_lm_head_is_not_shared(tmp_path):
    m = tiny_llama(vocab=VOCAB, tie=False)
    q = polyquant.quantize(m, polyquant.RTNConfig(bits=4, group_size=32), show_progress=False, kernel="reference")
    r = export(q, "onnx", tmp_path / "m.onnx", tokenizer_dir=False)
    assert r.extra["shared_initializers"] == [] and len(_float_mats(tmp_path / "m.onnx")) == 2


def test_bitnet_model_exports_its_ternary_weights_and_says_its_activations_are_not_carried(tmp_path, bpe):
    """Ternary layers become MatMulNBits 2-bit (zero point 1, one scale repeated): onnxruntime's logits are
    polyquant's with float activations; every layer is marked as not carrying BitNet's int8 activations."""
    q = _model(BitNetConfig())
    out = tmp_path / "b.onnx"
    r = export(q, "onnx", out, tokenizer=bpe)
    assert len(r.layers) == 14 and all(i["type"] == "MatMulNBits2" for i in r.layers.values())
    assert r.extra["activation_rules_not_carried"] == 14
    assert all(i["activations"].startswith("bitnet not carried") for i in r.layers.values())
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.act_quant = None
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        ref = q(ids).logits.numpy()
    got = _session(str(out)).run(["logits"], feeds(q.config, ids.numpy()))[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
