"""SpQR: the two-level statistics, the outlier rule, act-order, sizes, config checks."""
from __future__ import annotations

import math

import pytest
import torch

from polyquant.methods.gptq import GPTQConfig, gptq_quantize
from polyquant.methods.spqr import (SpQRConfig, _fake, decode_stats, decode_two_level, leave_one_out_gain, minmax_params,
                                    spqr_quantize, spqr_stats, two_level_encode)


def _problem(out=64, inp=96, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(n, inp, generator=g) * torch.linspace(0.3, 2.0, inp)
    return W, X, {"H": 2 * X.T @ X / n, "n": n}


def _out_err(W, Q, X):
    return float(((W - Q) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())


def test_two_level_statistics_round_trip():
    g = torch.Generator().manual_seed(1)
    v = torch.rand(40, generator=g) * 0.05 + 0.01  # 40 scales: runs of 16, 16 and a short one of 8
    codes, s2, z2, dec = two_level_encode(v, 3, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7 and s2.shape == z2.shape == (3,)
    assert s2.dtype == z2.dtype == torch.float16
    r = torch.arange(40) // 16
    # the decoded values are the float16 arithmetic fp16(s2 * fp16(q - z2)) of the stored codes and record
    manual = (s2[r] * (codes.half() - z2[r])).float()
    assert torch.equal(dec, manual)
    # ... and within half a step (plus float16 rounding) of the original
    assert ((dec - v).abs() <= s2[r].float() * 0.5 + 2e-4).all()
    # min and max of each run sit on the grid ends
    for k in range(3):
        run = slice(16 * k, min(16 * k + 16, 40))
        assert int(codes[run].min()) == 0 and int(codes[run].max()) == 7


def test_nearly_equal_values_keep_a_finite_second_order_zero():
    v = torch.full((16,), 0.0123) + torch.arange(16) * 1e-9  # the reference's zero -min/s2 would be ~1e6: inf in fp16
    codes, s2, z2, dec = two_level_encode(v, 3, 16)
    assert torch.isfinite(z2).all() and torch.isfinite(dec).all() and abs(float(z2[0])) <= 2048
    assert float((dec - v).abs().max()) <= 0.0123 * 3e-3  # float16 rounding of a subnormal step
    for x in (0.5, 0.0, -2.0):  # all equal: decoded to themselves (the reference's [-1, 1] gives 0.43 for 0.5)
        same = torch.full((16,), x)
        assert torch.allclose(two_level_encode(same, 3, 16)[3], same, atol=abs(x) / 1000 + 1e-7)


def test_quantized_weight_holds_exactly_what_its_statistics_decode_to():
    W, X, st = _problem()
    qw = spqr_quantize(W, SpQRConfig(), st)
    s = spqr_stats(qw)
    scale, zero = decode_stats(s["qs"], s["qz"], s["rec"], s["qq_groupsize"])
    assert torch.equal(scale, qw.scale) and torch.equal(zero, qw.zero)
    assert qw.qtype == "uint3" and qw.block == (1, 16) and qw.scale.shape == (64, 6)
    assert s["rec"].shape == (4, 6, 4)
    # one record entry checked by hand: row 17 group 2 uses run 1
    rr = s["rec"][1, 2]
    assert scale[17, 2] == decode_two_level(s["qs"][17, 2], rr[0], rr[1])
    assert zero[17, 2] == decode_two_level(s["qz"][17, 2], rr[2], rr[3])


def test_outliers_are_exactly_the_weights_above_the_threshold():
    # H = c I: no error feedback, so every weight is judged against the statistics of its group
    g = torch.Generator().manual_seed(3)
    out, inp, c, damp = 32, 48, 4.0, 1.0
    W = torch.randn(out, inp, generator=g) * 0.1
    planted = [(0, 0), (5, 17), (31, 47), (12, 30), (12, 40)]  # at most one per row and group: leave-one-out
    # judges one weight at a time (two spikes in one group hide each other, as in the reference)
    for r, k in planted:
        W[r, k] = 3.0 if (r + k) % 2 else -3.0
    st = {"H": c * torch.eye(inp), "n": 100}
    # threshold 3: above the leave-one-out gain of an ordinary weight of a spiked group (0.1-0.4 here, x 1/0.31),
    # far below a spike's (2.5); at 0.2 the whole spiked group would be judged likely outliers (reference rule)
    cfg = SpQRConfig(outlier_threshold=3.0, act_order=False, damp_percent=damp)
    qw = spqr_quantize(W, cfg, st)
    d = 1 / math.sqrt(c * (1 + damp))  # U_kk of (c (1 + damp) I)^-1
    thr = cfg.outlier_threshold * float((W.var(dim=0) / d ** 2).mean())
    dense = qw.without_outliers().dequantize()
    err = ((W - dense) / d).square()
    found = qw.outliers.to_dense() != 0
    assert torch.equal(found, err > thr)
    assert {(int(r), int(k)) for r, k in found.nonzero()} == set(planted)
    # the outliers do not stretch their group's range: the others stay within a few steps (half a step of
    # rounding, plus what the 3-bit quantization of scale and zero moves the grid: up to 2.4 steps here)
    normal = ~found
    s = qw.full_scale().float()
    ratio = ((W - dense).abs() / s)[normal]
    assert float(ratio.max()) <= 3.0 and float(ratio.mean()) < 0.3, (float(ratio.max()), float(ratio.mean()))
    assert float(s.max()) < 0.2  # a planted 3.0 in the range would give a scale above 0.4
    # stored: the float16 residual on top of the dense code
    assert torch.allclose(qw.dequantize()[found], W[found], atol=2e-3)
    assert qw.outliers.values.dtype == torch.float16


def test_leave_one_out_gain_flags_the_weight_that_stretches_the_range():
    w = torch.tensor([[0.1, -0.2, 0.05, 0.15, 4.0, -0.1, 0.0, 0.2]])
    gain = leave_one_out_gain(w, torch.ones(8), 7)
    assert int(gain.argmax()) == 4 and float(gain[0, 4]) > 3 * float(torch.cat([gain[0, :4], gain[0, 5:]]).max())
    s, z = minmax_params(torch.zeros(2, 4), 7)  # a flat row uses [-1, 1]
    assert torch.allclose(s, torch.full((2, 1), 2 / 7)) and torch.allclose(z, torch.full((2, 1), 3.5))


def _brute_leave_one_out_gain(w, d, maxq):
    """Every leave-one-out grid fitted on the others, one by one (the definition)."""
    out, g = w.shape
    full = ((_fake(w, *minmax_params(w, maxq), maxq) - w) / d).square().sum(-1)
    gain = torch.empty(out, g, dtype=torch.float64)
    for j in range(g):
        keep = [k for k in range(g) if k != j]
        x = w[:, keep]
        gain[:, j] = full - ((_fake(x, *minmax_params(x, maxq), maxq) - x) / d[keep]).square().sum(-1)
    return gain


@pytest.mark.parametrize("g", [2, 3, 16, 64])
def test_leave_one_out_gain_is_the_definition(g):
    gen = torch.Generator().manual_seed(g)
    w = torch.randn(48, g, generator=gen, dtype=torch.float64)
    w[:4] = torch.round(w[:4] * 2) / 2  # ties, at the extremes too
    w[4] = 0.25  # a flat row
    w[5, : g // 2 + 1] = w[5].amin()  # the minimum held by half the row
    d = torch.rand(g, generator=gen, dtype=torch.float64) + 0.5
    for maxq in (3, 7, 15):
        fast, ref = leave_one_out_gain(w, d, maxq), _brute_leave_one_out_gain(w, d, maxq)
        scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        assert float(((fast - ref).abs() / scale).max()) < 1e-9, (g, maxq)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_gain(w[:, :1], d[:1], 7)


def test_act_order_records_the_permutation_and_groups():
    W, X, st = _problem(inp=80)
    qw = spqr_quantize(W, SpQRConfig(act_order=True), st)
    perm = spqr_stats(qw)["perm"]
    assert torch.equal(perm, torch.argsort(torch.diagonal(st["H"]), descending=True))
    assert torch.equal(qw.g_idx.long(), torch.argsort(perm) // 16)
    assert qw.extras["in_perm"].dtype == torch.int16
    plain = spqr_quantize(W, SpQRConfig(act_order=False), st)
    assert plain.g_idx is None and "in_perm" not in plain.extras


def test_beats_gptq_and_counts_every_stored_byte():
    W, X, st = _problem(out=128, inp=128, n=1024)
    gptq = {b: _out_err(W, gptq_quantize(W, GPTQConfig(bits=b, group_size=64), st).dequantize(), X) for b in (3, 4)}
    for bits, ref in ((3, gptq[3]), (4, gptq[4])):
        qw = spqr_quantize(W, SpQRConfig(bits=bits), st)
        e = _out_err(W, qw.dequantize(), X)
        assert e < 0.7 * ref, (bits, e, ref)
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731
        want = nb(qw.data) + sum(nb(t) for t in qw.extras.values()) + qw.outliers.nbytes()
        assert qw.derived_fields() == ("scale", "zero", "g_idx")
        assert qw.nbytes() == want and qw.bits_per_weight == want * 8 / W.numel()
    no = spqr_quantize(W, SpQRConfig(outlier_threshold=float("inf")), st)
    assert no.outliers.nnz == 0 and no.outliers.nbytes() == 4 * 129


def test_config_checks_name_the_field():
    for kw, field in (({"bits": 8}, "bits"), ({"group_size": 1}, "group_size"), ({"qq_scale_bits": 0}, "qq_scale_bits"),
                      ({"outlier_threshold": 0}, "outlier_threshold"), ({"damp_percent": -1}, "damp_percent"),
                      ({"block_size": 100}, "block_size"), ({"act_order": 1}, "act_order")):
        with pytest.raises(ValueError, match=field):
            SpQRConfig(**kw)
    with pytest.raises(ValueError, match="calibration"):
        spqr_quantize(torch.randn(16, 16), SpQRConfig(), None)
    assert SpQRConfig().describe() == "spqr w3 g16 qq3/3x16 ol0.2 act-order"


def test_registered_with_its_formats():
    from polyquant.methods import get_method
    spec = get_method("spqr")
    assert spec.needs_calibration and spec.bits == (2, 3, 4) and spec.formats[0] == "spqr"


def test_calibration_resume_files_keep_the_outliers_and_statistics(tmp_path):
    from polyquant.calibration.checkpoint import ResumeState
    W, X, st = _problem()
    qw = spqr_quantize(W, SpQRConfig(), st)
    rs = ResumeState(tmp_path / "r", {"k": "v"}, 2)
    rs.save_block(0, {"q": qw}, {"q": 0.1})
    back = rs.load_block(0)[0]["q"]
    assert back.outliers is not None and back.outliers.nnz == qw.outliers.nnz > 0
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.nbytes() == qw.nbytes()
    assert set(back.extras) == set(qw.extras)
