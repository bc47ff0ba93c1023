"""BlockMemo: a block child's output is reused only when recomputation would give the very same
thing (equal inputs, unchanged modules / parameters, same autocast, no active hook inside), and
the driver's checkpoints are bit-identical with and without it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import polyquant
import polyquant.calibration.driver as driver
from polyquant.calibration.memo import BlockMemo
from polyquant.methods import GPTQConfig
from polyquant.nn import QuantLinear
from helpers import tiny_llama, tiny_qwen2


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x, scale=1.0, extra=None):
        self.calls += 1
        return self.lin(x) * scale


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.sub = _Counting()
        self.out = nn.Linear(8, 8)

    def forward(self, x, **kw):
        return self.out(self.sub(self.norm(x), **kw))


def _fresh():
    torch.manual_seed(0)
    return _Block()


def test_equal_inputs_reuse_the_output_and_anything_else_recomputes():
    blk, x = _fresh(), torch.randn(3, 8)
    with torch.no_grad(), BlockMemo(blk) as memo:
        memo.sample = 0
        y0 = blk(x)
        y1 = blk(x.clone())                      # equal values, another tensor: reused
        assert blk.sub.calls == 1 and torch.equal(y0, y1)
        blk(x + 1e-6)                            # other input: runs
        assert blk.sub.calls == 2
        memo.sample = 1
        blk(x + 1e-6)                            # another sample has its own entry
        assert blk.sub.calls == 3
        memo.sample = 0
        blk(x + 1e-6, scale=2.0)                 # another argument: runs
        assert blk.sub.calls == 4
        blk.sub.lin.weight.mul_(2)               # in-place change of a parameter: runs
        y = blk(x + 1e-6, scale=2.0)
        assert blk.sub.calls == 5
        ref = blk.out(blk.sub.lin(blk.norm(x + 1e-6)) * 2.0)
        assert torch.equal(y, ref)
        blk.sub.lin = nn.Linear(8, 8)            # a swapped module: runs
        blk(x + 1e-6, scale=2.0)
        assert blk.sub.calls == 6
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast: runs
            blk(x + 1e-6, scale=2.0)
        assert blk.sub.calls == 7
        memo.hooked = {id(blk.sub.lin)}          # a statistics hook inside: always runs
        blk(x + 1e-6, scale=2.0)
        blk(x + 1e-6, scale=2.0)
        assert blk.sub.calls == 9
        memo.hooked = set()
        blk(x, extra=object())                   # an argument it cannot compare: runs, not kept
        blk(x, extra=object())
        assert blk.sub.calls == 11
        memo.sample = None                       # outside a driver pass: plain forward
        blk(x)
        assert blk.sub.calls == 12
    assert "forward" not in blk.sub.__dict__     # wrappers removed on exit


def test_tensors_changed_in_place_are_never_reused_and_the_budget_is_honoured():
    blk, x = _fresh(), torch.randn(3, 8)
    with torch.no_grad(), BlockMemo(blk) as memo:
        memo.sample = 0
        blk.sub(x).add_(100.0)                   # the caller changes the output in place ...
        y = blk.sub(x)                           # ... so it is recomputed
        assert blk.sub.calls == 2 and torch.equal(y, blk.sub.lin(x))
        assert blk.sub(x) is y and blk.sub.calls == 2
        x.add_(1.0)                              # the very input tensor changed in place: recomputed
        z = blk.sub(x)
        assert blk.sub.calls == 3 and torch.equal(z, blk.sub.lin(x))
        blk.sub(x)[0].mul_(0)                    # (a reuse) then a view of it changed: recomputed
        assert torch.equal(blk.sub(x), blk.sub.lin(x)) and blk.sub.calls == 4
    with torch.no_grad(), BlockMemo(blk, budget_bytes=0) as memo:
        memo.sample = 0
        blk.sub(x), blk.sub(x)
        assert blk.sub.calls == 6 and memo.used == 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_driver_checkpoints_are_bit_identical_with_and_without_the_memo(make, monkeypatch):
    calib = [torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(7 + k)) for k in range(4)]
    cfg = GPTQConfig(bits=4, group_size=32)
    hits = []

    class Recording(BlockMemo):
        def __exit__(self, *exc):
            hits.append(self.hits)
            return super().__exit__(*exc)

    monkeypatch.setattr(driver, "BlockMemo", Recording)
    on = polyquant.quantize(make(layers=2), cfg, calibration=calib, show_progress=False, kernel="reference")
    # per block: the attention's output reused twice and q/k/v, gate/up's once, per sample
    assert hits and all(h >= 4 * (2 + 3 + 2) for h in hits), hits

    class Off:
        def __init__(self, blk):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(driver, "BlockMemo", Off)
    off = polyquant.quantize(make(layers=2), cfg, calibration=calib, show_progress=False, kernel="reference")
    a = {n: m.quantized_weight for n, m in on.named_modules() if isinstance(m, QuantLinear)}
    b = {n: m.quantized_weight for n, m in off.named_modules() if isinstance(m, QuantLinear)}
    assert set(a) == set(b) and len(a) == 14
    for n in a:
        assert torch.equal(a[n].data, b[n].data), n
        assert torch.equal(a[n].scale, b[n].scale), n


def test_last_pass_keeps_nothing_and_a_kept_child_drops_what_is_inside_it():
    blk, x = _fresh(), torch.randn(3, 8)
    with torch.no_grad(), BlockMemo(blk) as memo:
        memo.wrap("sub.lin", blk.sub.lin)
        memo.sample = 0
        memo.hooked = {id(blk.sub)}              # the parent runs; its Linear is kept
        blk.sub(x)
        assert set(memo._cache) == {("sub.lin", 0)}
        memo.hooked = set()
        blk.sub(x)                               # the parent kept: the Linear's entry is dropped
        assert set(memo._cache) == {("sub", 0)}
        memo.keep = False
        memo.sample = 1
        blk.sub(x)
        assert set(memo._cache) == {("sub", 0)} and memo.used == memo._cache[("sub", 0)].size
