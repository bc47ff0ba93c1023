"""AQLM: config checks, the solver's monotonicity (k-means and code search, per step), the compiled code
pass against the PyTorch one, schemes and the model-level path."""
from __future__ import annotations

import copy

import pytest
import torch

import polyquant
from polyquant.methods.aqlm import AQLMConfig, AQLMState, aqlm_fit, aqlm_quantize, weighted_kmeans
from polyquant.kernels.cpu_aqlm import sweep_available
from tests.helpers import tiny_llama


def _layer(out=32, inp=64, seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.1
    X = torch.randn(n, inp, generator=g) @ (torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=g) / inp ** 0.5)
    X[:, :3] *= 4  # a few strong inputs: the Hessian is far from a multiple of the identity
    return W, 2 * X.t() @ X / n


def _objective(W, H, qw):
    d = W - qw.dequantize()
    return float(((d @ H) * d).double().sum())


@pytest.mark.parametrize("kw, field", [({"nbits_per_codebook": 17}, "nbits_per_codebook"),
                                       ({"nbits_per_codebook": 0}, "nbits_per_codebook"),
                                       ({"num_codebooks": 0}, "num_codebooks"),
                                       ({"in_group_size": 0}, "in_group_size"),
                                       ({"beam_size": 0}, "beam_size"),
                                       ({"relative_tolerance": 2.0}, "relative_tolerance"),
                                       ({"finetune_epochs": -1}, "finetune_epochs"),
                                       ({"finetune_lr": 0.0}, "finetune_lr"),
                                       ({"finetune_lr": float("nan")}, "finetune_lr"),
                                       ({"finetune_batch": 0}, "finetune_batch"),
                                       ({"finetune_tolerance": 1.0}, "finetune_tolerance")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        AQLMConfig(**kw)


def test_group_size_must_divide_features():
    W, H = _layer(16, 60)
    with pytest.raises(ValueError, match="in_group_size 8 does not divide in_features 60"):
        aqlm_quantize(W, AQLMConfig(), {"H": H})
    W, H = _layer(15, 64)
    with pytest.raises(ValueError, match="out_group_size 2 does not divide out_features 15"):
        aqlm_quantize(W, AQLMConfig(out_group_size=2), {"H": H})
    with pytest.raises(ValueError, match="calibration"):
        aqlm_quantize(W, AQLMConfig(), None)


def test_weighted_kmeans_never_increases_its_objective():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g)
    wt = torch.rand(3000, 8, generator=g) + 0.05
    seen = []
    c, idx = weighted_kmeans(x, wt, 32, 15, torch.Generator().manual_seed(0), trace=lambda s, v: seen.append(v))
    assert len(seen) == 30
    for a, b in zip(seen, seen[1:]):
        assert b <= a * (1 + 1e-6) + 1e-9
    assert seen[-1] < 0.85 * seen[0]
    # the assignment is the weighted nearest centroid
    d = ((x[:, None] - c[None]) ** 2 * wt[:, None]).sum(-1)
    assert torch.equal(idx, d.argmin(1)) or float((d.gather(1, idx[:, None]) - d.min(1, keepdim=True).values).max()) < 1e-5


@pytest.mark.parametrize("og, beam", [(1, 1), (1, 3), (2, 1), (2, 2)])
def test_code_search_never_increases_the_objective(og, beam):
    W, H = _layer(16, 64)
    cfg = AQLMConfig(num_codebooks=2, nbits_per_codebook=4, out_group_size=og, beam_size=beam, max_iters=1,
                     init_iters=3)
    state, _ = aqlm_fit(W, H, cfg)
    seen = [state.objective()]
    state.code_sweep(beam, trace=lambda s, v: seen.append(v), compiled=False)
    assert len(seen) == 1 + 64 // 8
    for a, b in zip(seen, seen[1:]):
        assert b <= a * (1 + 1e-5)
    # the incremental R and G agree with a fresh computation
    o = state.objective()
    state.refresh()
    assert state.objective() == pytest.approx(o, rel=1e-4)


def test_alternation_improves_on_the_initialisation():
    W, H = _layer(32, 64)
    one, i1 = aqlm_fit(W, H, AQLMConfig(max_iters=1, nbits_per_codebook=6))
    many, i2 = aqlm_fit(W, H, AQLMConfig(max_iters=6, relative_tolerance=0.0, nbits_per_codebook=6))
    assert i2["objective"] < 0.97 * i1["objective"]
    # the codebook least-squares step alone never increases the objective (up to its fp16 rounding)
    s = copy.deepcopy(many)
    before = s.objective()
    s.update_codebooks(6)
    assert s.objective() <= before * (1 + 1e-3)
    before = s.objective()
    s.update_scales()
    assert s.objective() <= before * (1 + 1e-3)


@pytest.mark.skipif(not sweep_available(), reason="compiled kernels unavailable")
def test_compiled_pass_matches_pytorch_pass():
    W, H = _layer(24, 64)
    state, _ = aqlm_fit(W, H, AQLMConfig(nbits_per_codebook=6, max_iters=1, init_iters=2))
    a, b = copy.deepcopy(state), copy.deepcopy(state)
    a.code_sweep(1, compiled=False)
    n = b.code_sweep(1, compiled=True)
    assert n > 0
    agree = float((a.codes == b.codes).float().mean())
    assert agree > 0.98  # ties in float rounding aside
    assert b.objective() == pytest.approx(a.objective(), rel=1e-4)
    o = b.objective()
    b.refresh()
    assert b.objective() == pytest.approx(o, rel=1e-4)


@pytest.mark.parametrize("m, b", [(1, 8), (2, 8), (4, 8), (8, 8), (1, 16)])
def test_schemes(m, b):
    W, H = _layer(16, 64)
    cfg = AQLMConfig(num_codebooks=m, nbits_per_codebook=b, max_iters=2, init_iters=4)
    qw = aqlm_quantize(W, cfg, {"H": H})
    assert qw.qtype == f"vq{b}" and qw.codebooks.shape == (m, 1 << b, 1, 8) and qw.data.shape == (16, 8, m)
    assert qw.data.dtype == (torch.uint8 if b <= 8 else torch.int16)
    assert qw.codebooks.dtype == torch.float16 and qw.scale.dtype == torch.float16
    rel = _objective(W, H, qw) / float(((W @ H) * W).sum())
    assert rel < {1: 0.35, 2: 0.15, 4: 0.05, 8: 0.02}[m] if b == 8 else rel < 1e-3  # 65536 words > 128 vectors
    # honest size: the code books are counted
    assert qw.nbytes() == 16 * 8 * m * (1 if b <= 8 else 2) + m * (1 << b) * 8 * 2 + 16 * 2


def test_more_codebooks_fit_better():
    W, H = _layer(32, 64)
    errs = [_objective(W, H, aqlm_quantize(W, AQLMConfig(num_codebooks=m, nbits_per_codebook=6, max_iters=3), {"H": H}))
            for m in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2]


def test_model_quantize_and_progress_errors():
    torch.manual_seed(0)
    m = tiny_llama()
    calib = [torch.randint(0, 256, (1, 32)) for _ in range(4)]
    q = polyquant.quantize(m, AQLMConfig(max_iters=2, init_iters=4), calibration=calib, show_progress=False)
    errs = q.polyquant.extra.get("errors") or {}
    lins = [mod for mod in q.modules() if hasattr(mod, "quantized_weight")]
    assert len(lins) == 14 and all(mod.quantized_weight.layout == "vector" for mod in lins)
    if errs:
        assert max(errs.values()) < 0.1
