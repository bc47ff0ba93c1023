"""The batch-1 matrix-vector kernels (``polyquant.kernels.triton_gemv``) in Triton's interpreter
(CPU tensors) against float64 references: integer codes of 2/4/8 bits (sym / asym, group-wise /
per-channel, act-order, K split or not) and fp8 weights with the activation rule fused (every
recipe, per token / per group / static). The fp8 sums are compared at fp32 rounding: an activation
code that differed from the rule's by one step would show as an error many times larger. Plus an
ahead-of-time compile of both kernels for sm_80 / sm_90 (no GPU needed)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from helpers import compile_ahead, int_qweight  # noqa: E402

from polyquant.activations.fp8 import Fp8ActQuant, fp8_saturate  # noqa: E402
from polyquant.kernels.triton_gemv import fp8_gemv, fp8_gemv_reason, int_gemv, int_gemv_reason  # noqa: E402
from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("bits,sym,gs,act_order", [(4, True, 32, False), (4, False, 32, False), (8, True, -1, False),
                                                   (2, False, 32, False), (4, True, 32, True), (4, False, 64, True),
                                                   (8, False, 64, False)])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_int_gemv_matches_float64(bits, sym, gs, act_order, split):
    out, inp = 72, 160  # partial N tile, K not a multiple of the K step
    qw = int_qweight(out, inp, bits, gs, sym, act_order, seed=bits + 7 * (gs + act_order))
    buf = prepare_w4a16(qw)
    group = inp if gs == -1 else gs
    assert int_gemv_reason(buf, bits, group, inp) is None
    x = torch.randn(1, inp, generator=torch.Generator().manual_seed(1))
    y = int_gemv(x, buf, bits, group, qw.qt.code_offset, out, inp, split=split, block_k=64)
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert y.shape == (1, out) and y.dtype == torch.float32
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6


def test_w4a16_matmul_takes_the_gemv_for_one_row_and_agrees_with_the_matmul_kernel():
    qw = int_qweight(48, 96, 4, 32, False, False, seed=3)
    buf = prepare_w4a16(qw)
    x = torch.randn(1, 96).half()
    a = w4a16_matmul(x, buf, 4, 32, qw.qt.code_offset, 48, 96)
    b = w4a16_matmul(x, buf, 4, 32, qw.qt.code_offset, 48, 96, gemv=False)
    ref = x.double() @ qw.dequantize(torch.float64).T
    for y in (a, b):
        assert y.dtype == torch.float16
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-3


def test_int_gemv_refuses_irregular_act_order_and_odd_groups():
    qw = int_qweight(32, 64, 4, 32, True, True, seed=0)
    buf = prepare_w4a16(qw)
    buf_irregular = dict(buf, g_idx=torch.zeros(64, dtype=torch.int32))
    assert "act-order" in int_gemv_reason(buf_irregular, 4, 32, 64)
    assert "multiple" in int_gemv_reason(dict(buf, scales=torch.ones(2, 32)), 4, 36, 64)
    with pytest.raises(ValueError, match="one row"):
        int_gemv(torch.randn(2, 64), buf, 4, 32, 8, 32, 64)


def _fp8_weight(n, k, block, seed):
    g = torch.Generator().manual_seed(seed)
    bn, bk = block
    ws = torch.rand(math.ceil(n / bn), math.ceil(k / bk), generator=g) * 0.01 + 0.001
    full = ws.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    wq = fp8_saturate(torch.randn(n, k, generator=g) / full)
    return wq, ws, wq.double() * full.double()


@pytest.mark.parametrize("recipe,group,static", [("ct", None, False), ("fbgemm", None, False), ("deepseek", 128, False),
                                                 ("deepseek", None, False), ("ct", 64, False), ("ct", None, True)])
@pytest.mark.parametrize("block", [(128, 128), (1, 256), (96, 256)])
def test_fp8_gemv_applies_the_activation_rule_exactly(recipe, group, static, block):
    n, k = 96, 256
    act = Fp8ActQuant(recipe, group, scale_ub=30.0 if recipe == "fbgemm" else None, scale=0.02 if static else None)
    wq, ws, wd = _fp8_weight(n, k, block, seed=len(recipe) + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).bfloat16() * 3  # some codes saturate
    x[0, :7] = 0
    assert fp8_gemv_reason(act, k, block) is None
    ref = act.fake_quant(x).double() @ wd.T
    for split in (None, 1, 2):
        y = fp8_gemv(x, act, wq, ws, block, torch.float32, split=split)
        assert y.shape == (1, n)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6, split


def test_fp8_gemv_codes_round_like_torch_across_the_range():
    """One-hot weights read the activation codes back: every one equals the saturating cast."""
    k = 128
    act = Fp8ActQuant("ct", scale=1.0)
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    for x in (torch.linspace(-500, 500, k)[None], torch.randn(1, k) * 100, torch.randn(1, k) * 1e-3,
              torch.tensor([[127.3, 127.9, 240.1, 0.0139, 1e-6] + [0.0] * (k - 5)])):
        y = fp8_gemv(x, act, eye, torch.ones(1, 1), (k, k), torch.float32, split=1)
        assert torch.equal(y, fp8_saturate(x).float())


def test_fp8_gemv_reasons():
    assert "no fp8" in fp8_gemv_reason(None, 256, (128, 128))
    assert "groups of 48" in fp8_gemv_reason(Fp8ActQuant("ct", 48), 256, (128, 128))
    assert fp8_gemv_reason(Fp8ActQuant("ct", 128), 256, (128, 128)) is None


_COMPILE = r"""
from polyquant.kernels import triton_gemv as tg
for zero, perm in ((False, False), (True, True)):
    k = build(tg._int_gemv_kernel, {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*fp32",
                                    "perm_ptr": "*i32", "y_ptr": "*fp32"},
              dict(BITS=4, OFFSET=8, HAS_ZERO=zero, HAS_PERM=perm, BLOCK_N=64, BLOCK_W=32))
    assert k.asm.get("cubin")
if cap >= 89:
    for mode, mul in ((0, True), (1, False), (2, False)):
        k = build(tg._fp8_gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "sx_ptr": "*fp32",
                                        "y_ptr": "*bf16", "floor": "fp32", "ub": "fp32"},
                  dict(ROUND_MUL=mul, HAS_FLOOR=mul, HAS_UB=mul, MODE=mode, EMULATE_CAST=False, BLOCK_N=32,
                       BLOCK_K=128))
        assert k.asm.get("cubin") and "e4m3" in k.asm["ptx"], mode
print("ok")
"""


@pytest.mark.parametrize("cap", [80, 90])
def test_gemv_kernels_compile_for_nvidia_targets_without_a_gpu(cap):
    """Compiled ahead to cubins in a fresh process: there TRITON_INTERPRET is unset when triton is
    imported (this process set it, so that the interpreter runs tl.sum)."""
    compile_ahead(_COMPILE, cap)
