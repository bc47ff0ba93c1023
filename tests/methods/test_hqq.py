"""HQQ method: hqq's min-max init on hand-checked groups, the proximal solver against a plain
(unchunked) implementation of its definition, groupings and refusals, and - when the hqq library is
installed - reconstruction error within 1% of hqq's own ``Quantizer.quantize``."""
from __future__ import annotations

import math

import pytest
import torch

import polyquant.methods.hqq as H
from helpers import sqnr_db
from polyquant.methods import config_from_dict, get_method
from polyquant.methods.hqq import HQQConfig, hqq_grouping, hqq_init_params, hqq_optimize_zero, hqq_quantize


def heavy_tailed(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A weight with a few large entries, like an LLM's Linear weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    mask = torch.rand(out, inp, generator=g) < 0.01
    return w + mask * torch.randn(out, inp, generator=g) * 0.2


def plain_hqq(w: torch.Tensor, bits: int, gs: int, round_zero: bool, iters: int = 20, beta: float = 10.0,
              kappa: float = 1.01, p: float = 0.7) -> torch.Tensor:
    """The solver written straight from its definition (axis 1), for comparison: dequantized weight."""
    wg = w.float().reshape(-1, gs)
    max_v = 2 ** bits - 1
    mn, mx = wg.min(1, keepdim=True)[0], wg.max(1, keepdim=True)[0]
    s = max_v / (mx - mn)
    s = torch.where((mx - mn).abs() <= 1e-4, torch.ones_like(s), s).clamp(max=2e4)
    z = -mn * s
    if round_zero:
        z = z.round()
    best, best_z = math.inf, z
    for _ in range(iters):
        q = torch.clamp(torch.round(wg * s + z), 0, max_v)
        wr = (q - z) / s
        err = float((wg - wr).abs().mean())
        if err < best:
            best, best_z = err, z
        else:
            z = best_z
            break
        d = wg - wr
        we = torch.sign(d) * torch.relu(d.abs() - d.abs().pow(p - 1) / beta)
        z = torch.mean(q - (wg - we) * s, dim=1, keepdim=True)
        beta *= kappa
    q = torch.clamp(torch.round(wg * s + z), 0, max_v)
    return ((q - z) / s).reshape(w.shape)


def test_init_params_hand_checked():
    # one group [0, 1, 2, 3] at 2 bits: inverse scale 3 / 3 = 1, zero 0 -> codes 0..3, exact
    wg = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, -1.00001]])
    s, z = hqq_init_params(wg, 2, round_zero=False)
    assert s[0].item() == 1.0 and z[0].item() == 0.0
    # a (near-)constant group (range <= 1e-4) gets inverse scale 1 and zero -min
    assert s[1].item() == 1.0 and z[1].item() == pytest.approx(1.00001)
    # round_zero rounds the initial zero
    s, z = hqq_init_params(torch.tensor([[-0.3, 1.2]]), 4, round_zero=True)
    assert s.item() == pytest.approx(15 / 1.5) and z.item() == 3.0  # -(-0.3) * 10 = 3


def test_unoptimized_is_min_max_rounding_exact_on_grid():
    w = torch.arange(64, dtype=torch.float32).reshape(2, 32) * 0.5 - 3.0  # rows on a 0.5 grid of 32 levels
    qw = hqq_quantize(w, HQQConfig(bits=5, group_size=32, optimize=False))
    assert qw.qtype == "uint5" and qw.block == (1, 32)
    assert torch.equal(qw.dequantize(), w)
    assert torch.equal(qw.codes[0], torch.arange(32, dtype=torch.uint8))


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (2, 16)])
def test_solver_matches_plain_definition(bits, gs):
    w = heavy_tailed(64, 128)
    ours = hqq_quantize(w, HQQConfig(bits=bits, group_size=gs)).dequantize()
    ref = plain_hqq(w, bits, gs, round_zero=(bits == 4))
    # same algorithm, different float summation order: reconstruction error equal to 0.1%
    e_ours, e_ref = (w - ours).abs().mean().item(), (w - ref).abs().mean().item()
    assert e_ours == pytest.approx(e_ref, rel=1e-3)
    assert (ours - ref).abs().gt(1e-6).float().mean().item() < 0.01  # at most 1% of values differ


def test_optimizing_beats_min_max_and_keeps_best_zero():
    w = heavy_tailed(96, 128, seed=3)
    for bits in (2, 3, 4):
        opt = hqq_quantize(w, HQQConfig(bits=bits, group_size=64)).dequantize()
        plain = hqq_quantize(w, HQQConfig(bits=bits, group_size=64, optimize=False)).dequantize()
        assert (w - opt).abs().mean() < (w - plain).abs().mean()
    # early stop keeps the best evaluated zero: more iterations never make the l1 error worse
    wg = w.reshape(-1, 64)
    s, z = hqq_init_params(wg, 3, False)
    errs = []
    for iters in (1, 3, 10, 20, 40):
        zz = hqq_optimize_zero(wg, s, z, 3, iters=iters)
        q = torch.clamp(torch.round(wg * s + zz), 0, 7)
        errs.append((wg - (q - zz) / s).abs().mean().item())
    assert errs[-1] <= errs[0]


def test_chunking_does_not_change_the_result(monkeypatch):
    w = heavy_tailed(48, 256, seed=1)
    full = hqq_quantize(w, HQQConfig(bits=3, group_size=64))
    monkeypatch.setattr(H, "_CHUNK", 64 * 5)  # 5 groups per chunk, uneven last chunk
    chunked = hqq_quantize(w, HQQConfig(bits=3, group_size=64))
    assert torch.equal(full.codes, chunked.codes)
    assert torch.allclose(full.zero, chunked.zero, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [b for b in range(1, 9) if b != 7])  # the widths hqq lists (no 7)
def test_every_bit_width(bits):
    w = heavy_tailed(32, 128, seed=bits)
    qw = hqq_quantize(w, HQQConfig(bits=bits, group_size=32))
    assert qw.qtype == f"uint{bits}" and qw.zero is not None and qw.zero.dtype == torch.float32
    assert int(qw.codes.max()) <= 2 ** bits - 1
    # dequantize() is (q - z) * s with a float zero, exactly as hqq
    s = qw.full_scale()
    z = qw.full_zero()
    assert torch.equal(qw.dequantize(), (qw.codes.float() - z) * s)
    floor = {1: 0, 2: 4, 3: 10, 4: 16, 5: 22, 6: 28, 7: 34, 8: 40}[bits]
    assert sqnr_db(w, qw.dequantize()) > floor


def test_groupings_and_refusals():
    assert hqq_grouping((64, 128), 64, 1) == (64, (1, 64))
    assert hqq_grouping((64, 128), -1, 1) == (128, (1, 128))
    assert hqq_grouping((64, 128), -1, 0) == (64, (64, 1))
    assert hqq_grouping((64, 128), 64, 0) == (64, (64, 1))  # group_size == out: whole columns
    with pytest.raises(ValueError, match="axis=0 groups of 32"):
        hqq_grouping((64, 128), 32, 0)
    assert hqq_grouping((64, 64), 128, 1) == (128, (2, 64))  # a group is two whole rows
    with pytest.raises(ValueError, match="straddle rows"):
        hqq_grouping((64, 96), 64, 1)
    w = heavy_tailed(64, 128)
    qw = hqq_quantize(w, HQQConfig(bits=4, group_size=-1, axis=0))
    assert qw.block == (64, 1) and tuple(qw.scale.shape) == (1, 128)
    assert sqnr_db(w, qw.dequantize()) > 10


@pytest.mark.parametrize("field,value", [("bits", 0), ("bits", 9), ("group_size", 0), ("axis", 2), ("lp_norm", 0.0),
                                         ("lp_norm", 1.5), ("beta", 0), ("kappa", 0.5), ("iters", 0),
                                         ("round_zero", "yes"), ("compute_dtype", "float64"), ("optimize", 1)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HQQConfig(**{field: value})


def test_registry_and_config_round_trip():
    spec = get_method("hqq")
    assert spec.formats[0] == "hqq" and not spec.needs_calibration
    cfg = HQQConfig(bits=3, group_size=32, compute_dtype="float16")
    assert config_from_dict(cfg.to_dict()) == cfg
    qw = hqq_quantize(heavy_tailed(16, 64), cfg)
    assert qw.scale.dtype == torch.float16 and qw.zero.dtype == torch.float16
    assert HQQConfig().rounds_zero and not HQQConfig(bits=3).rounds_zero


# -- against the hqq library ------------------------------------------------------------------

@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 64), (2, 32), (8, 64)])
def test_reconstruction_within_one_percent_of_hqq(bits, gs):
    hqq_q = pytest.importorskip("hqq.core.quantize", reason="the hqq library is not installed")
    w = heavy_tailed(192, 256, seed=7)
    wq, meta = hqq_q.Quantizer.quantize(w, nbits=bits, group_size=gs, optimize=True, round_zero=(bits == 4), axis=1,
                                        device="cpu", bitpack=False)
    ref = ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
    ours = hqq_quantize(w, HQQConfig(bits=bits, group_size=gs)).dequantize()
    for err in (lambda a: (w - a).abs().mean().item(), lambda a: (w - a).pow(2).mean().item()):
        assert err(ours) <= err(ref) * 1.01
    # without the beta schedule (hqq 0.2.8's default solver keeps beta fixed) the codes are hqq's
    same = hqq_quantize(w, HQQConfig(bits=bits, group_size=gs, kappa=1.0))
    assert (same.codes.reshape(-1).float() == wq.reshape(-1).float()).float().mean().item() > 0.995
