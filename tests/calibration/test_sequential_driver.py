"""The sequential driver: captured inputs reproduce the real forward, statistics are collected at
the right place (true-sequential or not), resume after an interruption is bit-exact, Linears
outside the blocks (lm_head) are calibrated from the final hidden states, and bad input is refused."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import polyquant
from polyquant.calibration import Calibration, run_sequential
from polyquant.calibration.driver import _capture, _run_block
from polyquant.methods import GPTQConfig, RTNConfig
from polyquant.methods.registry import MethodSpec, register_method, unregister_method
from polyquant.methods.rtn import rtn_quantize
from polyquant.nn import QuantLinear, find_blocks
from helpers import qweights, tiny_bert, tiny_llama, tiny_qwen2


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=4, seqlen=24, vocab=250):
    return [torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(100 + k)) for k in range(n)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_bert])
def test_captured_inputs_and_block_outputs_reproduce_the_real_forward(make):
    model = make(layers=3)
    calib = _calib()
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inps, recs, _ = _capture(model, blocks, [{"input_ids": c} for c in calib], None)
        assert len(inps) == len(calib)
        for j, c in enumerate(calib):
            hs = model(c, output_hidden_states=True).hidden_states
            h = inps[j]
            assert (h - hs[0]).abs().max() < 1e-5
            outs = []
            for i, b in enumerate(blocks):
                h = _run_block(b, h, recs[j][i])
                outs.append(h)
            # decoders apply the final norm to the last hidden state they return
            for i in range(len(blocks) - (0 if make is tiny_bert else 1)):
                assert (outs[i] - hs[i + 1]).abs().max() < 1e-5


class _Recorder:
    """A calibration method that records the statistics it is given and rounds to 8 bits."""

    def __init__(self):
        self.stats = []

    def __call__(self, weight, config, stats):
        self.stats.append({"H": stats["H"].clone(), "n": stats["n"], "weight": weight.clone()})
        return rtn_quantize(weight, RTNConfig(bits=8, group_size=-1), None)


@pytest.fixture
def recorder():
    from dataclasses import dataclass
    from polyquant.methods.base import MethodConfig

    @dataclass
    class RecConfig(MethodConfig):
        true_sequential: bool = True

    rec = _Recorder()
    register_method(MethodSpec("test-recorder", RecConfig, rec, True, "calibration-based", (8,), ("compressed-tensors",)))
    yield rec, RecConfig
    unregister_method("test-recorder")


def _hessian_of(model, module_name, calib):
    xs = []
    h = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for c in calib:
            model(c)
    h.remove()
    x = torch.cat(xs).double()
    return (2 * x.T @ x / x.shape[0]).float(), x.shape[0]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_statistics_are_those_of_the_partly_quantized_model(recorder, true_sequential):
    rec, RecConfig = recorder
    model = tiny_llama(layers=2)
    calib = _calib()
    q = polyquant.quantize(model, RecConfig(true_sequential=true_sequential), calibration=calib,
                           show_progress=False, kernel="reference")
    names = q.polyquant.modules
    assert len(rec.stats) == len(names) == 14
    by_name = dict(zip(names, rec.stats))  # block order, group order == module order for Llama
    # block 0, q_proj: the float model's input statistics; n counts tokens
    H, n = _hessian_of(model, "model.layers.0.self_attn.q_proj", calib)
    assert by_name["model.layers.0.self_attn.q_proj"]["n"] == n == 4 * 24
    torch.testing.assert_close(by_name["model.layers.0.self_attn.q_proj"]["H"], H, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_name["model.layers.0.self_attn.v_proj"]["H"], H, rtol=1e-4, atol=1e-5)
    assert by_name["model.layers.0.self_attn.v_proj"]["n"] == n  # shared input: counted once, not thrice
    # block 0, down_proj: true-sequential sees every earlier Linear already quantized
    ref = tiny_llama(layers=2)
    if true_sequential:
        for nm in names[:6]:
            ref.get_submodule(nm).weight.data = q.get_submodule(nm).quantized_weight.dequantize()
    H, _ = _hessian_of(ref, "model.layers.0.mlp.down_proj", calib)
    torch.testing.assert_close(by_name["model.layers.0.mlp.down_proj"]["H"], H, rtol=1e-4, atol=1e-5)
    # block 1, q_proj: inputs are block 0's outputs with block 0 quantized
    for nm in names[:7]:
        ref.get_submodule(nm).weight.data = q.get_submodule(nm).quantized_weight.dequantize()
    H, _ = _hessian_of(ref, "model.layers.1.self_attn.q_proj", calib)
    torch.testing.assert_close(by_name["model.layers.1.self_attn.q_proj"]["H"], H, rtol=1e-4, atol=1e-5)


def test_gptq_model_is_closer_to_float_than_rtn():
    model = tiny_llama(layers=2, hidden=128)
    calib = _calib(8, 48)
    x = _calib(2, 48, 250)[1]
    g = polyquant.quantize(model, GPTQConfig(bits=3, group_size=32), calibration=calib,
                           show_progress=False, kernel="reference")
    r = polyquant.quantize(model, RTNConfig(bits=3, group_size=32), kernel="reference")
    with torch.no_grad():
        ref = model(x).logits
        eg, er = (g(x).logits - ref).pow(2).mean(), (r(x).logits - ref).pow(2).mean()
    assert all(isinstance(g.get_submodule(n), QuantLinear) for n in g.polyquant.modules)
    assert eg < 0.7 * er, (float(eg), float(er))  # measured about 0.4


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_exact(tmp_path):
    model = tiny_llama(layers=3)
    calib = _calib()
    cfg = GPTQConfig(bits=4, group_size=16, act_order=True)
    full = polyquant.quantize(model, cfg, calibration=calib, show_progress=False)

    h = model.model.layers[2].self_attn.q_proj.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        polyquant.quantize(model, cfg, calibration=Calibration(calib, resume_dir=tmp_path), show_progress=False)
    h.remove()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["blocks_done"] == 2 and sorted(p.name for p in tmp_path.glob("block_*")) == \
        ["block_0000.safetensors", "block_0001.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))

    calls = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    resumed = polyquant.quantize(model, cfg, calibration=Calibration(calib, resume_dir=tmp_path), show_progress=False)
    h.remove()
    assert len(calls) == 1  # only the capture's output-structure probe: block 0 was loaded, not recomputed
    a, b = qweights(full), qweights(resumed)
    assert sorted(a) == sorted(b) and len(a) == 21
    for n in a:
        for k, t in a[n].tensors().items():
            assert torch.equal(t, b[n].tensors()[k]), (n, k)
    assert json.loads((tmp_path / "state.json").read_text())["blocks_done"] == 3


def test_resume_folder_of_another_run_is_refused(tmp_path):
    model = tiny_llama(layers=2)
    calib = _calib(2)
    polyquant.quantize(model, GPTQConfig(bits=4, group_size=16), calibration=Calibration(calib, resume_dir=tmp_path),
                       show_progress=False)
    with pytest.raises(ValueError, match="different run.*config"):
        polyquant.quantize(model, GPTQConfig(bits=3, group_size=16), calibration=Calibration(calib, resume_dir=tmp_path),
                           show_progress=False)
    with pytest.raises(ValueError, match="different run.*calibration"):
        polyquant.quantize(model, GPTQConfig(bits=4, group_size=16),
                           calibration=Calibration(_calib(3), resume_dir=tmp_path), show_progress=False)


def test_lm_head_is_calibrated_from_the_final_hidden_states(recorder):
    rec, RecConfig = recorder
    model = tiny_llama(layers=2, tie=False)
    calib = _calib()
    q = polyquant.quantize(model, RecConfig(quantize_lm_head=True), calibration=calib,
                           show_progress=False, kernel="reference")
    assert q.polyquant.modules[-1] == "lm_head" and isinstance(q.lm_head, QuantLinear)
    ref = tiny_llama(layers=2, tie=False)
    for nm in q.polyquant.modules[:-1]:
        ref.get_submodule(nm).weight.data = q.get_submodule(nm).quantized_weight.dequantize()
    H, n = _hessian_of(ref, "lm_head", calib)
    assert rec.stats[-1]["n"] == n
    torch.testing.assert_close(rec.stats[-1]["H"], H, rtol=1e-4, atol=1e-5)


def test_refuses_missing_or_empty_calibration():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        polyquant.quantize(model, GPTQConfig(group_size=16))
    with pytest.raises(ValueError, match="no calibration samples"):
        polyquant.quantize(model, GPTQConfig(group_size=16), calibration=[])


def test_explicit_device_and_no_progress_bar_change_nothing():
    model = tiny_llama(layers=2)
    calib = _calib(2)
    a = polyquant.quantize(model, GPTQConfig(bits=4, group_size=16), calibration=calib, show_progress=False)
    b = polyquant.quantize(model, GPTQConfig(bits=4, group_size=16), calibration=Calibration(calib, device="cpu"))
    for n, qw in qweights(a).items():
        assert torch.equal(qw.codes, qweights(b)[n].codes)


def test_source_model_is_untouched_and_training_mode_restored():
    model = tiny_llama(layers=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    polyquant.quantize(model, GPTQConfig(bits=4, group_size=16), calibration=_calib(2), show_progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_autocast_calibration_is_close_to_float32(recorder):
    rec, RecConfig = recorder
    model = tiny_llama(layers=2)
    calib = _calib()
    polyquant.quantize(model, RecConfig(), calibration=calib, show_progress=False)
    exact = [s["H"] for s in rec.stats]
    rec.stats.clear()
    polyquant.quantize(model, RecConfig(), calibration=Calibration(calib, autocast=torch.bfloat16),
                       show_progress=False)
    assert len(rec.stats) == len(exact)
    first = rec.stats[0]["H"]
    assert first.dtype == torch.float32 and torch.equal(first, exact[0])  # block 0's inputs: no matmul yet
    later = [float((s["H"] - e).norm() / e.norm()) for s, e in zip(rec.stats[1:], exact[1:])]
    assert 0 < max(later) < 0.05, later  # bf16 matmuls upstream: close, not identical


def test_autocast_auto_resolves_by_device_and_dtype(monkeypatch):
    from polyquant.calibration.driver import resolve_autocast
    model = tiny_llama(layers=1)
    assert resolve_autocast("auto", model) is None  # CPU: exact forwards by default
    assert resolve_autocast(None, model) is None and resolve_autocast(torch.bfloat16, model) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_autocast("auto", model, torch.device("cuda")) is torch.bfloat16
    assert resolve_autocast("auto", model.to(torch.bfloat16), torch.device("cuda")) is None  # already 16-bit
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast("bf16", model)


def test_autocast_is_recorded_on_the_model(recorder):
    rec, RecConfig = recorder
    q = polyquant.quantize(tiny_llama(layers=2), RecConfig(), calibration=_calib(), show_progress=False)
    assert q.polyquant.extra["calibration"]["autocast"] is None
    q = polyquant.quantize(tiny_llama(layers=2), RecConfig(), calibration=Calibration(_calib(), autocast=torch.bfloat16),
                           show_progress=False)
    assert q.polyquant.extra["calibration"]["autocast"] == "bfloat16"
