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
from helpers import qweights, tiny_llama, tiny_qwen2


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


@pytest.fixture
def sdpa_runs(monkeypatch):
    """``(runs, wrapper)``: ``scaled_dot_product_attention`` replaced by a wrapper that counts."""
    runs = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        runs.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return runs, counting


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
def test_driver_checkpoints_are_bit_identical_with_and_without_the_memo(make, monkeypatch, sdpa_runs):
    calib = [torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(7 + k)) for k in range(4)]
    cfg = GPTQConfig(bits=4, group_size=32)
    hits = []

    class Recording(BlockMemo):
        def __exit__(self, *exc):
            hits.append(self.hits)
            return super().__exit__(*exc)

    runs, counting_sdpa = sdpa_runs
    monkeypatch.setattr(driver, "BlockMemo", Recording)
    model = make(layers=2)
    assert model.config._attn_implementation == "sdpa"
    on = polyquant.quantize(model, cfg, calibration=calib, show_progress=False, kernel="reference")
    # per block: the attention module's output reused twice, its attention core once (in the
    # gate/up pass, where o_proj's stand-in makes the module run), q/k/v and gate/up once, per sample
    assert hits and all(h >= 4 * (2 + 1 + 3 + 2) for h in hits), hits
    assert torch.nn.functional.scaled_dot_product_attention is counting_sdpa  # restored on exit
    with_memo = len(runs)
    runs.clear()

    class Off:
        def __init__(self, blk):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(driver, "BlockMemo", Off)
    off = polyquant.quantize(make(layers=2), cfg, calibration=calib, show_progress=False, kernel="reference")
    # the attention core ran once per sample and block (the o_proj pass), not four times (the
    # passes for o_proj, gate/up, down and the outputs); the capture's own forward aside
    assert len(runs) - with_memo == 4 * 2 * 3 and with_memo <= 4 * 2 + 1, (len(runs), with_memo)
    a, b = qweights(on), qweights(off)
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


class _Attn(nn.Module):
    """Two attention-core calls per forward (ranks 0 and 1 in this module's scope)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.dropout = dropout

    def forward(self, x):
        q = self.q(x).view(1, 2, -1, 4)
        k = v = x.view(1, 2, -1, 4)
        F = torch.nn.functional
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout)
        b = F.scaled_dot_product_attention(k, q, v, dropout_p=self.dropout)
        return (a + 2 * b).reshape(x.shape)


class _AttnBlock(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.attn = _Attn(dropout)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.attn(x))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_attention_core_is_reused_only_for_equal_inputs_and_without_dropout(dropout, sdpa_runs):
    runs, counting = sdpa_runs
    torch.manual_seed(0)
    blk, x, y = _AttnBlock(dropout), torch.randn(6, 8), torch.randn(6, 8)
    with torch.no_grad(), BlockMemo(blk) as memo:
        memo.hooked = {id(blk.attn.q)}           # the module runs (a hook inside); its core may be kept
        memo.sample = 0
        first = blk(x)
        memo.sample = 1
        blk(y)
        assert len(runs) == 4
        memo.sample = 0
        again = blk(x)
        if dropout:                              # not a pure function: never reused
            assert len(runs) == 6
        else:
            assert len(runs) == 4 and torch.equal(first, again)   # both ranks reused
            with torch.no_grad():
                blk.attn.q.weight.add_(1.0)      # q changes: rank 0 recomputed; rank 1 too (q is its key)
            memo.sample = 0
            changed = blk(x)
            assert len(runs) == 6
            memo_off = torch.nn.functional.scaled_dot_product_attention
    assert torch.nn.functional.scaled_dot_product_attention is counting  # restored
    if not dropout:
        assert memo_off is not counting
        with torch.no_grad():
            assert torch.equal(changed, blk(x))  # what recomputation gives


class _Recorder:
    """A collector that is not shared: it keeps every input it is given."""

    def __init__(self):
        self.xs = []

    def add(self, x):
        self.xs.append(x.clone())


class _Siblings(nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.twice = twice
        self.calls = {"q": 0, "k": 0, "v": 0}
        for n in self.calls:
            getattr(self, n).register_forward_hook(lambda m, a, o, n=n: self.calls.__setitem__(n, self.calls[n] + 1))

    def forward(self, h):
        x = self.norm(h)
        q = self.q(x)
        if self.twice:
            q = self.q(q)                        # q called again on another input: no siblings
        return q + torch.cat([self.k(x), self.v(x)], -1)


@pytest.mark.parametrize("twice", [False, True])
def test_linears_sharing_an_input_are_fed_together_and_only_the_first_sample_runs_them(twice):
    torch.manual_seed(0)
    blk = _Siblings(twice)
    inps = [torch.randn(5, 8) for _ in range(4)]
    lins = {n: getattr(blk, n) for n in ("q", "k", "v")}
    with torch.no_grad():
        got = driver._collect(blk, lins, lambda mod: _Recorder(), inps, [("arg", (), {})] * 4)
        xs = [blk.norm(h) for h in inps]
        qx = [blk.q(x) for x in xs]
    for n in ("k", "v"):
        assert len(got[n].xs) == 4 and all(torch.equal(a, b) for a, b in zip(got[n].xs, xs)), n
    if twice:   # every call of q seen, on every sample; k, v still fed once per sample
        assert len(got["q"].xs) == 8
        assert all(torch.equal(got["q"].xs[2 * j], xs[j]) and torch.equal(got["q"].xs[2 * j + 1], qx[j])
                   for j in range(4))
    else:       # q, k, v: one input; from the second sample on the forward stops at q's input
        assert len(got["q"].xs) == 4 and all(torch.equal(a, b) for a, b in zip(got["q"].xs, xs))
        assert blk.calls == {"q": 1 + 4, "k": 1, "v": 0}, blk.calls   # (+ 4: the test's own qx)


def test_another_threads_attention_calls_go_straight_through(sdpa_runs):
    import threading
    runs, _ = sdpa_runs
    torch.manual_seed(0)
    blk, x = _AttnBlock(), torch.randn(6, 8)
    with torch.no_grad(), BlockMemo(blk) as memo:
        memo.sample = 0
        blk(x)
        assert len(runs) == 2
        t = threading.Thread(target=lambda: blk.attn(x))   # same inputs, another thread: computed
        t.start()
        t.join()
        assert len(runs) == 4
        blk(x)                                          # this thread: reused
        assert len(runs) == 4
