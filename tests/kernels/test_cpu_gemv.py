"""cpu-gemv: the lanes layout against its definition, dequantization bit-exact with the reference, the
matrix-vector products within float32 rounding of the reference kernel on every code path this CPU
runs (AVX2, portable), threads, float and bf16 descriptors, and auto never choosing it."""
from __future__ import annotations

import pytest
import torch

import polyquant
from polyquant.kernels import cext
from polyquant.kernels.base import select_kernel
from polyquant.kernels.cpu_gemv import (BF16, DEQUANT_MIN_M, CpuGemvKernel, gemv, linear_desc, pack_lanes,
                                        q_dequantize, simd_levels, tile_rows)
from polyquant.methods.rtn import RTNConfig, rtn_quantize

CPU = torch.device("cpu")
KERNEL = CpuGemvKernel()

if reason := cext.library_error("gemv"):  # pragma: no cover - every CI machine has a C compiler
    pytest.skip(f"cpu-gemv cannot be built here: {reason}", allow_module_level=True)

SIMD = simd_levels()


def _qw(n, k, seed=0, **cfg):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return rtn_quantize(w, RTNConfig(**cfg))


@pytest.mark.parametrize("bits", [4, 8])
def test_lanes_layout_is_the_documented_order(bits):
    n, k = 6, 128  # two row tiles, the second padded with zero rows
    codes = torch.randint(0, 2 ** bits, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    p = pack_lanes(codes, bits)
    per = 32 // bits
    blk = 8 * per
    assert p.shape == (2, k * bits // 8) and p.dtype == torch.int32
    words = p.view(2, k // blk, 4, 8).to(torch.int64) & 0xFFFFFFFF  # [tile, block, row, lane]
    for r in range(8):
        for b in range(k // blk):
            for j in range(per):
                got = (words[r // 4, b, r % 4] >> (bits * j)) & (2 ** bits - 1)
                want = codes[r, b * blk + 8 * j: b * blk + 8 * j + 8].to(torch.int64) if r < n else torch.zeros(8)
                assert torch.equal(got, want.to(torch.int64)), (r, b, j)
    s = torch.arange(12.0).view(6, 2)
    ts = tile_rows(s)
    assert ts.shape == (2, 2, 4) and torch.equal(ts[0, 1], s[:4, 1]) and torch.equal(ts[1, 0, 2:], torch.zeros(2))


CASES = [dict(bits=4, group_size=64), dict(bits=4, group_size=32, sym=False), dict(bits=4, group_size=-1),
         dict(bits=3, group_size=64, sym=False), dict(bits=2, group_size=128), dict(bits=8, group_size=-1),
         dict(bits=8, group_size=-1, sym=False), dict(bits=8, group_size=32)]


@pytest.mark.parametrize("cfg", CASES)
def test_dequantize_is_bit_exact(cfg):
    qw = _qw(42, 256, **cfg)
    assert KERNEL.supports(qw, CPU) is None
    b = KERNEL.prepare(qw)
    n, k, bits, off = (int(v) for v in b["meta"])
    assert (n, k) == (42, 256)
    assert torch.equal(q_dequantize(b["w"], b["s"], b.get("z"), off, n, k, bits), qw.dequantize())


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("cfg", CASES)
@pytest.mark.parametrize("m", [1, 3])
def test_matvec_within_float32_rounding(cfg, m, simd):
    qw = _qw(43, 320 if cfg["bits"] > 4 else 384, seed=2, **cfg)  # 43 rows: a partial last tile
    layer = polyquant.QuantLinear(qw, kernel="cpu-gemv")
    keep = []
    desc, why = linear_desc(layer, keep)
    assert why is None
    x = torch.randn(m, qw.shape[1], generator=torch.Generator().manual_seed(3))
    w = qw.dequantize()
    y = gemv(desc, x, simd=simd)
    ref = x.double() @ w.double().T
    bound = 4e-7 * (x.abs().double() @ w.abs().double().T) + 1e-30  # |error| per output against sum |x w|
    assert ((y.double() - ref).abs() <= bound * qw.shape[1] ** 0.5).all()
    # the float32 reference kernel (dequantize + matmul) agrees to float32 rounding too
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5 * float((x @ w.T).abs().max()))


def test_threads_give_bit_identical_rows():
    qw = _qw(130, 576, bits=4, group_size=64)
    layer = polyquant.QuantLinear(qw, kernel="cpu-gemv")
    desc, _ = linear_desc(layer, [])
    x = torch.randn(1, 576)
    assert torch.equal(gemv(desc, x, threads=1), gemv(desc, x, threads=2))


@pytest.mark.parametrize("m", [1, 5, DEQUANT_MIN_M + 1])
def test_module_forward_with_bias_against_the_reference_kernel(m):
    qw = _qw(40, 192, bits=4, group_size=64, sym=False)
    bias = torch.randn(40)
    fast = polyquant.QuantLinear(qw, bias, kernel="cpu-gemv")
    ref = polyquant.QuantLinear(qw, bias, kernel="reference")
    x = torch.randn(2, m, 192)
    y, want = fast(x), ref(x)
    assert y.shape == want.shape == (2, m, 40)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    assert "kernel=cpu-gemv" in repr(fast)


def test_float_and_bf16_descriptors():
    from polyquant.nn.runtime import FloatHead
    lin = torch.nn.Linear(96, 70, bias=True)
    x = torch.randn(1, 96)
    d, _ = linear_desc(lin, [])
    assert torch.allclose(gemv(d, x), lin(x).detach(), rtol=1e-5, atol=1e-6)
    head = FloatHead(torch.nn.Linear(96, 70, bias=False).to(torch.bfloat16), torch.float32)
    d, _ = linear_desc(head, [])
    assert d.kind == BF16 and d.bf16_io == 1
    y, want = gemv(d, x), head(x).detach()
    assert torch.equal(y, y.to(torch.bfloat16).float())  # output rounded to bf16, as torch.mv's
    assert ((y - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()  # within one bf16 step of torch's
    d, why = linear_desc(torch.nn.Linear(8, 8).to(torch.float16), [])
    assert d is None and "float16" in why


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("k", [67, 5])  # not a multiple of 8: the vector loop and the scalar tail
def test_dense_rows_with_a_tail_on_every_path(simd, k):
    from polyquant.kernels.cpu_gemv import F32, GemvLinear
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, k, generator=g), torch.randn(7, k, generator=g)  # 7 rows: a tile of 4 and 3 single rows
    d = GemvLinear(F32, 7, k, k, w.data_ptr(), None, None, 0.0, 0, None)
    assert torch.allclose(gemv(d, x, simd=simd), x @ w.T, rtol=1e-5, atol=1e-5)
    wb = w.to(torch.bfloat16)
    d = GemvLinear(BF16, 7, k, k, wb.view(torch.int16).data_ptr(), None, None, 0.0, 0, None)
    assert torch.allclose(gemv(d, x, simd=simd), x @ wb.float().T, rtol=1e-5, atol=1e-5)


def test_refusals_and_auto_never_picks_it():
    from polyquant.methods.bnb import BnbNF4Config, bnb_quantize_4bit
    w = torch.randn(32, 128)
    assert "integer" in KERNEL.supports(bnb_quantize_4bit(w, BnbNF4Config()), CPU)
    assert "8-bit" in KERNEL.supports(rtn_quantize(w, RTNConfig(bits=5, group_size=32)), CPU)
    assert "multiple of 64" in KERNEL.supports(rtn_quantize(torch.randn(8, 96), RTNConfig(bits=4, group_size=32)), CPU)
    qw = rtn_quantize(w, RTNConfig(bits=4, group_size=64))
    assert KERNEL.supports(qw, CPU) is None
    assert select_kernel(qw, CPU)[0].name != "cpu-gemv"  # explicit only
    assert select_kernel(qw, CPU, "cpu-gemv")[0].name == "cpu-gemv"
