"""Block fine-tuning (``MethodSpec.block_tuner``, ``calibration/tune.py``) through AQLM, the method that
uses it: the tuned block matches the float block better on its calibration inputs (measured here,
independently of the tuner's own figures), only code books and scales move (codes, norms and biases
stay), the run is deterministic, the tuned values are what the checkpoint stores, and resume gives
the same model (bad fine-tuning configs: tests/methods/test_aqlm.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import polyquant
from polyquant.calibration import Calibration
from polyquant.methods import aqlm as aqlm_mod
from polyquant.methods.aqlm import AQLMConfig
from tests.helpers import tiny_qwen2

CFG = dict(num_codebooks=1, nbits_per_codebook=4, max_iters=1, init_iters=3)


def _calib(n=6, seqlen=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def _quantize(model, calib, **kw):
    return polyquant.quantize(copy.deepcopy(model), AQLMConfig(**CFG, **kw), calibration=Calibration(calib, autocast=None),
                              show_progress=False)


def _block0_error(model, ref, calib) -> float:
    """Relative squared error of block 0's outputs against the float model's, on the calibration windows
    (block 0's inputs are the embeddings in both models)."""
    outs = {}

    def grab(key):
        def hook(mod, args, out):
            outs.setdefault(key, []).append((out if isinstance(out, torch.Tensor) else out[0]).detach())
        return hook
    hs = [model.model.layers[0].register_forward_hook(grab("q")), ref.model.layers[0].register_forward_hook(grab("f"))]
    with torch.no_grad():
        for ids in calib:
            model(ids)
            ref(ids)
    for h in hs:
        h.remove()
    num = sum(float((q - f).pow(2).sum()) for q, f in zip(outs["q"], outs["f"]))
    return num / sum(float(f.pow(2).sum()) for f in outs["f"])


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    model = tiny_qwen2()
    calib = _calib()
    seen = []
    orig = aqlm_mod.fit_block

    def spy(*a, **k):
        r = orig(*a, **k)
        seen.append(r)
        return r
    aqlm_mod.fit_block = spy
    try:
        plain = _quantize(model, calib)
        assert not seen  # finetune_epochs=0: the driver never calls a tuner
        tuned = _quantize(model, calib, finetune_epochs=8, finetune_lr=1e-3, finetune_batch=2)
    finally:
        aqlm_mod.fit_block = orig
    return model, calib, plain, tuned, seen


def _qlinears(m):
    return {n: mod for n, mod in m.named_modules() if hasattr(mod, "quantized_weight")}


def test_tuning_lowers_the_block_output_error(runs):
    model, calib, plain, tuned, seen = runs
    assert len(seen) == 2 and all(r.loss_after < r.loss_before for r in seen)
    assert all(r.history[0] == r.loss_before and min(r.history) == r.loss_after for r in seen)
    before, after = _block0_error(plain, model, calib), _block0_error(tuned, model, calib)
    assert after < 0.95 * before, (before, after)


def test_only_code_books_and_scales_move(runs):
    model, _, plain, tuned, _ = runs
    qp, qt = _qlinears(plain), _qlinears(tuned)
    assert qp.keys() == qt.keys() and len(qp) == 14
    moved = 0
    for name in qp:
        a, b = qp[name].quantized_weight, qt[name].quantized_weight
        if name.startswith("model.layers.0."):  # later blocks see the tuned block's outputs: other codes
            assert torch.equal(a.codes, b.codes), name
        assert b.codebooks.dtype == torch.float16 and b.scale.dtype == torch.float16
        moved += not torch.equal(a.codebooks, b.codebooks) or not torch.equal(a.scale, b.scale)
        if qp[name].bias is not None:
            assert torch.equal(qp[name].bias, qt[name].bias), name
    assert moved == len(qp)
    floats = {k: v for k, v in model.state_dict().items() if "norm" in k or "embed" in k}
    tuned_sd = tuned.state_dict()
    assert all(torch.equal(tuned_sd[k], v) for k, v in floats.items())
    assert all(p.requires_grad for p in model.parameters())  # the source model's flags untouched


def test_tuning_is_deterministic_and_saved_as_tuned(runs, tmp_path):
    model, calib, _, tuned, _ = runs
    again = _quantize(model, calib, finetune_epochs=8, finetune_lr=1e-3, finetune_batch=2)
    for name, m in _qlinears(tuned).items():
        o = _qlinears(again)[name].quantized_weight
        assert torch.equal(m.quantized_weight.codebooks, o.codebooks) and torch.equal(m.quantized_weight.scale, o.scale)
    polyquant.save(tuned, tmp_path / "ck")
    back, _ = polyquant.load(tmp_path / "ck")
    ids = calib[0]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, tuned(ids).logits)


def test_resume_gives_the_same_tuned_model(tmp_path):
    torch.manual_seed(0)
    model = tiny_qwen2()
    calib = _calib(4)
    kw = dict(finetune_epochs=3, finetune_lr=1e-3)
    full = _quantize(model, calib, **kw)
    calls = []
    orig = aqlm_mod.fit_block

    def stop_at_block_1(job, *a, **k):
        if job.index == 1:
            raise KeyboardInterrupt
        calls.append(job.index)
        return orig(job, *a, **k)
    aqlm_mod.fit_block = stop_at_block_1
    try:
        with pytest.raises(KeyboardInterrupt):
            polyquant.quantize(copy.deepcopy(model), AQLMConfig(**CFG, **kw),
                               calibration=Calibration(calib, autocast=None, resume_dir=tmp_path / "r"), show_progress=False)
    finally:
        aqlm_mod.fit_block = orig
    assert calls == [0]
    resumed = polyquant.quantize(copy.deepcopy(model), AQLMConfig(**CFG, **kw),
                                 calibration=Calibration(calib, autocast=None, resume_dir=tmp_path / "r"), show_progress=False)
    for name, m in _qlinears(full).items():
        o = _qlinears(resumed)[name].quantized_weight
        assert torch.equal(m.quantized_weight.codebooks, o.codebooks), name


def test_tuning_gives_the_same_model_at_any_thread_count():
    """The tuner's gradients (Adam over summed sample losses) are reduced in a fixed order: one and two
    intra-op threads give bit-identical code books and scales (a block wide enough for torch to split
    its matmuls and reductions across threads)."""
    torch.manual_seed(0)
    model = tiny_qwen2(hidden=128, layers=1)
    calib = _calib(4, seqlen=96)
    threads = torch.get_num_threads()
    out = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            q = _quantize(model, calib, finetune_epochs=3, finetune_lr=1e-2)
            out[t] = {n: m.quantized_weight for n, m in _qlinears(q).items()}
    finally:
        torch.set_num_threads(threads)
    assert out[1].keys() == out[2].keys() and len(out[1]) == 7
    for name, a in out[1].items():
        b = out[2][name]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scale, b.scale), name
