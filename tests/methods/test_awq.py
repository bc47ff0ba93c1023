"""AWQ: the config, the quantizer (AutoAWQ's formulas), the scale and clipping searches against
naive references, folding (the float model is unchanged), error vs RTN on outlier activations,
the calibration-driver integration (biases, lm_head, resume, restore on failure), refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import AUTO_INT4, tiny_llama, tiny_qwen2
from torch import nn

import polyquant
from polyquant.calibration import Calibration
from polyquant.calibration.arch import block_groups
from polyquant.methods import RTNConfig, config_from_dict, get_method
from polyquant.methods import awq as awq_mod
from polyquant.methods.awq import (AWQConfig, awq_fake_quantize, awq_quantize, fold_scales, scale_groups,
                                   search_clip, search_scales)
from polyquant.methods.rtn import rtn_quantize
from polyquant.nn.quant_linear import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=6, seqlen=32, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def _mha_llama(seed=0):
    """A tiny Llama without grouped-query attention (v's outputs map onto o's inputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _mha_qwen2(seed=0):
    """A tiny Qwen2 (q/k/v with bias) without grouped-query attention: v's bias is folded too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _out_err(Q, W, H):
    d = (Q - W).double()
    return float(((d @ H.double()) * d).sum())


# -- config ------------------------------------------------------------------------------------

def test_config_defaults_validation_and_registry():
    c = AWQConfig()
    assert (c.bits, c.group_size, c.zero_point, c.version, c.n_grid, c.duo_scaling, c.clip, c.clip_grid,
            c.clip_max_shrink) == (4, 128, True, "gemm", 20, False, True, 20, 0.5)
    assert config_from_dict(AWQConfig(bits=3, version="GEMV").to_dict()) == AWQConfig(bits=3, version="gemv")
    spec = get_method("awq")
    assert spec.needs_calibration and spec.formats == ("awq", "compressed-tensors")
    assert callable(spec.quantize_block)
    for kw, field in [({"bits": 7}, "bits"), ({"bits": True}, "bits"), ({"group_size": 0}, "group_size"),
                      ({"version": "marlin"}, "version"), ({"n_grid": 0}, "n_grid"),
                      ({"clip_max_shrink": 1.0}, "clip_max_shrink"), ({"zero_point": 1}, "zero_point"),
                      ({"clip_skip": "q_"}, "clip_skip"), ({"scale_dtype": "int8"}, "scale_dtype")]:
        with pytest.raises(ValueError, match=field):
            AWQConfig(**kw)


# -- the quantizer ------------------------------------------------------------------------------

def test_quantizer_is_autoawq_pseudo_quantize():
    """uint4 codes, integer zeros, scale = (max - min) / 15 rounded to fp16 (the range need not
    contain 0, unlike GPTQ's); the signed variant uses absmax / 7."""
    w = torch.tensor([[0.10, 0.20, 0.30, 0.70],
                      [-1.0, -0.5, 0.25, 2.0]])
    qw = awq_quantize(w, AWQConfig(bits=4, group_size=4, clip=False))
    assert qw.qtype == "uint4" and qw.block == (1, 4)
    for r in range(2):
        lo, hi = float(w[r].min()), float(w[r].max())
        s = float(torch.tensor((hi - lo) / 15).to(torch.float16))
        z = min(max(-round(lo / s), 0), 15)
        codes = [min(max(round(float(v) / s) + z, 0), 15) for v in w[r]]
        assert float(qw.scale[r, 0]) == s and float(qw.zero[r, 0]) == z
        assert qw.codes[r].tolist() == codes
    assert torch.equal(qw.dequantize(), awq_fake_quantize(w, AWQConfig(bits=4, group_size=4)))
    # row 0 is all positive: min = 0.1 > 0, so zero = -round(0.1 / s) clamps to 0 (AutoAWQ does not widen)
    assert float(qw.zero[0, 0]) == 0

    sym = awq_quantize(w, AWQConfig(bits=4, group_size=4, zero_point=False, clip=False))
    assert sym.qtype == "int4" and sym.zero is None
    s1 = float(torch.tensor(2.0 / 7).to(torch.float16))
    assert float(sym.scale[1, 0]) == s1
    assert (sym.codes[1].long() - 8).tolist() == [max(-8, min(7, round(float(v) / s1))) for v in w[1]]


def test_short_last_group_and_per_channel():
    w = torch.randn(8, 40)
    qw = awq_quantize(w, AWQConfig(bits=4, group_size=16, clip=False))
    assert qw.block == (1, 16) and tuple(qw.scale.shape) == (8, 3)
    last = w[:, 32:]
    assert torch.allclose(qw.scale[:, 2], _fp16((last.amax(1) - last.amin(1)) / 15))
    pc = awq_quantize(w, AWQConfig(bits=8, group_size=-1, clip=False))
    assert pc.block == (1, 40) and pc.qtype == "uint8"
    assert (pc.dequantize() - w).abs().max() < float(pc.scale.max())


def _fp16(t):
    return t.to(torch.float16).float()


# -- scale search -----------------------------------------------------------------------------

def _single(seed=0, out=64, inp=128, n=4096, dominant=None, signs=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    if signs:  # |x| exactly 1 everywhere: perfectly uniform activation magnitudes
        X = torch.randint(0, 2, (n, inp), generator=g).float() * 2 - 1
    else:
        X = torch.randn(n, inp, generator=g)
    if dominant:
        X[:, :dominant] *= 30
    return W, X, X.T @ X / n, X.abs().mean(0)


def test_search_picks_alpha_zero_for_uniform_activations():
    cfg = AWQConfig(bits=4, group_size=32)
    W, X, H, xm = _single(signs=True)
    s, alpha, hist = search_scales([W], H, xm, cfg)
    assert alpha == 0.0 and torch.equal(s, torch.ones_like(s)) and len(hist) == 20
    # i.i.d. channels (equal statistics up to sampling noise): scaling buys nothing (< 1%)
    for seed in range(3):
        W, X, H, xm = _single(seed=seed)
        s, alpha, hist = search_scales([W], H, xm, cfg)
        assert min(hist) >= 0.99 * hist[0], (seed, alpha, hist)


def test_search_picks_positive_alpha_when_few_channels_dominate_and_beats_rtn():
    cfg = AWQConfig(bits=4, group_size=32)
    W, X, H, xm = _single(dominant=4)
    s, alpha, hist = search_scales([W], H, xm, cfg)
    assert alpha >= 0.25 and min(hist) < 0.5 * hist[0]
    assert s[:4].min() > 3 * s[4:].max()  # the dominant channels get the large scales
    # the loss is the output error on the calibration inputs, computed exactly from H:
    i = int(round(alpha * 20))
    Q = awq_fake_quantize(W * s, cfg) / s
    assert hist[i] == pytest.approx(float(((Q - W) @ X.T).pow(2).sum()) / X.shape[0] / W.shape[0], rel=1e-3)
    # AWQ (scales + clipping) vs RTN with the same asymmetric quantizer, same bits and groups
    awq = awq_quantize(W * s, cfg, {"H": H / (s[:, None] * s[None, :])}).dequantize() / s
    rtn = rtn_quantize(W, RTNConfig(bits=4, group_size=32, sym=False)).dequantize()
    e_awq, e_rtn = _out_err(awq, W, H), _out_err(rtn, W, H)
    assert e_awq < 0.4 * e_rtn, (e_awq, e_rtn)


def test_duo_scaling_is_autoawq_formula():
    cfg = AWQConfig(bits=4, group_size=32, duo_scaling=True, n_grid=4)
    W, X, H, xm = _single(dominant=4, inp=64)
    s, alpha, hist = search_scales([W], H, xm, cfg)
    wa = W.abs().reshape(W.shape[0], -1, 32)
    w_mean = (wa / (wa.amax(-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(0)
    ref = (xm.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    ref = ref / (ref.max() * ref.min()).sqrt()
    assert torch.allclose(s, ref, rtol=1e-5)


# -- clipping search ----------------------------------------------------------------------------

def _naive_clip(W, X, cfg):
    """AutoAWQ's _compute_best_clip written out with the tokens (all of them, float64 error):
    per (row, group) the chosen bound and the error of every candidate bound."""
    out, inp = W.shape
    gs = cfg.group_size
    best = torch.zeros(out, inp // gs)
    errs = {}
    for o in range(out):
        for g in range(inp // gs):
            w = W[o, g * gs:(g + 1) * gs]
            x = X[:, g * gs:(g + 1) * gs].double()
            org = float(w.abs().max())
            best_err, best_max = 1e30, org
            for i in range(int(cfg.clip_max_shrink * cfg.clip_grid)):
                mx = org * (1 - i / cfg.clip_grid)
                q = awq_fake_quantize(torch.clamp(w, -mx, mx).view(1, -1), cfg).view(-1)
                err = float((x @ (q - w).double()).pow(2).mean())
                errs[(o, g, i)] = err
                if err < best_err:
                    best_err, best_max = err, mx
            best[o, g] = best_max
    return best, errs


def test_clip_search_matches_token_level_reference():
    cfg = AWQConfig(bits=3, group_size=16)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 48, generator=g)
    W[:, 5] *= 6  # an outlier weight column: clipping pays off
    X = torch.randn(512, 48, generator=g) * torch.linspace(0.2, 2, 48)
    got = search_clip(W, X.T @ X / X.shape[0], cfg)
    ref, errs = _naive_clip(W, X, cfg)
    org = W.abs().reshape(6, 3, 16).amax(-1)
    n = int(cfg.clip_max_shrink * cfg.clip_grid)
    same = 0
    for o in range(6):
        for gi in range(3):
            i = round((1 - float(got[o, gi]) / float(org[o, gi])) * cfg.clip_grid)
            best = min(errs[(o, gi, j)] for j in range(n))
            assert errs[(o, gi, i)] <= best * (1 + 1e-5), (o, gi)  # the token-level optimum (up to ties)
            same += bool(torch.isclose(got[o, gi], ref[o, gi], rtol=1e-6))
    assert same >= 17, same
    assert (got < W.abs().reshape(6, 3, 16).amax(-1) * 0.999).any()  # some groups are clipped
    # the quantized weight is the clipped one
    qw = awq_quantize(W, cfg, {"H": X.T @ X / X.shape[0]})
    clipped = torch.clamp(W, -got.repeat_interleave(16, 1), got.repeat_interleave(16, 1))
    assert torch.equal(qw.dequantize(), awq_fake_quantize(clipped, cfg))
    # q/k projections are not clipped (AutoAWQ's avoid_clipping names)
    assert torch.equal(awq_quantize(W, cfg, {"H": X.T @ X}, name="self_attn.q_proj").dequantize(),
                       awq_fake_quantize(W, cfg))


# -- folding ------------------------------------------------------------------------------------

def _groups(model):
    blk = model.model.layers[0]
    names = [n for n, m in blk.named_modules() if isinstance(m, nn.Linear)]
    return block_groups(model, names, True)


@pytest.mark.parametrize("make", [_mha_llama, _mha_qwen2, tiny_llama])
def test_folding_arbitrary_scales_leaves_the_float_model_unchanged(make):
    """Scales spanning four orders of magnitude folded into every scalable group (norms, v -> o
    rows and bias, up -> down rows): logits change by < 1e-5 (max abs, fp32)."""
    model = make()
    x = torch.randint(0, 256, (2, 24))
    ref = _logits(model, x)
    g = torch.Generator().manual_seed(3)
    folded = set()
    for blk in model.model.layers:
        for group in _groups(model):
            lins = [blk.get_submodule(n) for n in group.names]
            feed, why = awq_mod._fold_target(blk, group, lins[0].in_features)
            if feed is None:
                continue
            s = torch.exp(torch.randn(lins[0].in_features, generator=g) * 1.5)
            fold_scales(feed, lins, s)
            folded.add(group.names)
    got = _logits(model, x)
    assert (got - ref).abs().max() < 1e-5, float((got - ref).abs().max())
    expect = {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
              ("mlp.down_proj",)}
    if make is not tiny_llama:  # grouped-query attention: v has fewer outputs than o has inputs
        expect.add(("self_attn.o_proj",))
    assert folded == expect


def _skewed_stats(model, g):
    """Per-input statistics with a few dominant channels, shared by Linears with one input."""
    stats = {}
    for blk in model.model.layers[:1]:
        for group in _groups(model):
            lin = blk.get_submodule(group.names[0])
            xm = torch.rand(lin.in_features, generator=g) + 0.1
            xm[torch.randperm(lin.in_features, generator=g)[:3]] *= 40
            shared = {"H": torch.diag(xm ** 2) + 0.01 * torch.outer(xm, xm), "x_mean": xm}
            for n in group.names:
                stats[n] = shared
    return stats


@pytest.mark.parametrize("make", [_mha_llama, _mha_qwen2])
def test_scale_search_and_fold_keep_the_float_model(make):
    model = make()
    x = torch.randint(0, 256, (2, 24))
    ref = _logits(model, x)
    blk = model.model.layers[0]
    targets = {n: m for n, m in blk.named_modules() if isinstance(m, nn.Linear)}
    stats = _skewed_stats(model, torch.Generator().manual_seed(0))
    old = {n: s["x_mean"].clone() for n, s in stats.items()}
    v_bias = blk.self_attn.v_proj.bias.clone() if blk.self_attn.v_proj.bias is not None else None
    chosen = scale_groups(model, blk, targets, stats, AWQConfig(bits=4, group_size=32))
    assert len(chosen) == 4 and all(a > 0 for a in chosen.values()), chosen
    assert (_logits(model, x) - ref).abs().max() < 1e-5
    # the statistics now describe the scaled inputs (x / s), shared dicts updated once
    assert not torch.equal(stats["mlp.down_proj"]["x_mean"], old["mlp.down_proj"])
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]
    if v_bias is not None:
        assert not torch.equal(blk.self_attn.v_proj.bias, v_bias)  # v -> o folded into v's bias too


def test_gqa_skips_v_to_o_and_unknown_architecture_is_refused():
    model = tiny_llama()
    blk = model.model.layers[0]
    targets = {n: m for n, m in blk.named_modules() if isinstance(m, nn.Linear)}
    stats = _skewed_stats(model, torch.Generator().manual_seed(0))
    chosen = scale_groups(model, blk, targets, stats, AWQConfig(bits=4, group_size=32))
    assert ("self_attn.o_proj",) not in chosen and len(chosen) == 3

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=4, vocab_size=256)).eval()
    with pytest.raises(ValueError, match="gpt_neox"):
        polyquant.quantize(neox, AWQConfig(group_size=32), calibration=_calib(2), show_progress=False)


# -- end to end through the calibration driver ---------------------------------------------------

def _outlier_llama():
    """Tiny Llama whose norms give 3 hidden channels 20x the others (activation outliers)."""
    model = tiny_llama(seed=2, layers=2)
    with torch.no_grad():
        for blk in model.model.layers:
            for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 20
    return model


def test_awq_beats_rtn_end_to_end_on_outlier_channels():
    model = _outlier_llama()
    calib, x = _calib(8, 64), torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(9))
    ref = _logits(model, x)
    rtn = polyquant.quantize(model, RTNConfig(bits=3, group_size=32, sym=False),
                             show_progress=False, kernel="reference")
    awq = polyquant.quantize(model, AWQConfig(bits=3, group_size=32), calibration=calib,
                             show_progress=False, kernel="reference")
    e_rtn = float((_logits(rtn, x) - ref).pow(2).mean())
    e_awq = float((_logits(awq, x) - ref).pow(2).mean())
    assert e_awq < 0.6 * e_rtn, (e_awq, e_rtn)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_driver_quantizes_every_target_and_leaves_the_source_alone(make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = polyquant.quantize(model, AWQConfig(bits=4, group_size=32), calibration=_calib(), show_progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    qls = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 14 and q.polyquant.method == "awq"
    for n, m in qls.items():
        qw = m.quantized_weight
        assert qw.qtype == "uint4" and qw.block == (1, 32) and torch.equal(qw.zero, qw.zero.round())
        assert m.kernel_name == AUTO_INT4
    if make is tiny_qwen2:
        assert q.model.layers[0].self_attn.q_proj.bias is not None
    x = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(_logits(q, x)).all()


def test_lm_head_is_quantized_without_scaling():
    model = tiny_llama()
    q = polyquant.quantize(model, AWQConfig(bits=4, group_size=32, quantize_lm_head=True), calibration=_calib(),
                           show_progress=False)
    assert isinstance(q.lm_head, QuantLinear)
    # no scaling reached the (float) embedding the head was tied to
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)


class _Boom(Exception):
    pass


def test_failure_leaves_the_model_as_it_was(monkeypatch):
    model = _outlier_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise _Boom()
    monkeypatch.setattr(awq_mod, "awq_quantize", boom)  # fails after the scales were folded
    with pytest.raises(_Boom):
        polyquant.quantize(model, AWQConfig(bits=4, group_size=32), calibration=_calib(), inplace=True,
                           show_progress=False)
    assert calls
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(v, after[k]) for k, v in before.items())


class _Interrupt(Exception):
    pass


def test_resume_restores_folded_norms_bit_exactly(tmp_path):
    model = _outlier_llama()
    calib = _calib()
    cfg = AWQConfig(bits=4, group_size=32)
    full = polyquant.quantize(model, cfg, calibration=calib, show_progress=False)

    src = copy.deepcopy(model)
    h = src.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        polyquant.quantize(src, cfg, calibration=Calibration(calib, resume_dir=tmp_path), show_progress=False)
    h.remove()
    assert json.loads((tmp_path / "state.json").read_text())["blocks_done"] == 1
    resumed = polyquant.quantize(src, cfg, calibration=Calibration(calib, resume_dir=tmp_path), show_progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the folded norm of block 0 differs from the source: it came from the resume folder
    assert not torch.equal(b["model.layers.0.input_layernorm.weight"], model.model.layers[0].input_layernorm.weight)


def test_cli_quantize_awq_gemv(tmp_path, capsys):
    from helpers import tiny_tokenizer_dir

    from polyquant.cli import main
    d = tmp_path / "tiny"
    tiny_llama(seed=1).save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer_dir(d)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 250}" for i in range(3000)))
    out = tmp_path / "q"
    code = main(["quantize", str(d), "--method", "awq", "--bits", "4", "--group-size", "32", "--calib-samples", "4",
                 "--calib-seqlen", "32", "--calib-text", str(text), "--format", "awq", "--opt", "version=gemv",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["version"], qcfg["bits"], qcfg["group_size"], qcfg["zero_point"]) == \
        ("awq", "gemv", 4, 32, True)
    model, _ = polyquant.load(out)
    assert model.model.layers[0].mlp.down_proj.quantized_weight.qtype == "uint4"


def test_bf16_calibration_autocast_keeps_the_fold_check_exact():
    """Under bf16 calibration forwards (the default on CPUs with AMX) the fold check still compares
    exact float32 forwards, so bf16 noise does not trip it (it did before run_sample(exact=True))."""
    model = _outlier_llama()
    calib = _calib(4)
    q = polyquant.quantize(model, AWQConfig(bits=4, group_size=32), calibration=Calibration(calib, autocast=torch.bfloat16),
                           show_progress=False)
    assert q.polyquant.extra["calibration"]["autocast"] == "bfloat16"
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 14
