"""cpu-lut4: the compiled 4-bit code-book kernel (NF4 / FP4) against the format's definition and the
reference kernel, on each of its code paths this CPU runs (AVX-512, AVX2, the portable loop)."""
from __future__ import annotations

import pytest
import torch

import polyquant
from helpers import AUTO_INT4, sqnr_db, tiny_llama
from polyquant.kernels import cext
from polyquant.kernels.base import select_kernel
from polyquant.kernels.cpu_lut4 import (DEQUANT_MIN_M, CpuLut4Kernel, lut4_dequantize, lut4_mm, pack_lut4,
                                        simd_levels)
from polyquant.methods.bnb import Bnb4bitConfig, BnbFP4Config, BnbNF4Config, bnb_quantize_4bit
from polyquant.methods.rtn import RTNConfig, rtn_quantize
from polyquant.nn.quantize import kernel_summary, set_kernels
from polyquant.tensor.quantized_weight import QuantizedWeight

CPU = torch.device("cpu")
KERNEL = CpuLut4Kernel()

if reason := cext.library_error("lut4"):  # pragma: no cover - every CI machine has a C compiler
    pytest.skip(f"cpu-lut4 cannot be built here: {reason}", allow_module_level=True)

SIMD = simd_levels()  # 0 portable C, 2 AVX2, 1 AVX-512: every path this CPU can run


def _qw(n: int, k: int, cfg: Bnb4bitConfig, seed: int = 0) -> QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return bnb_quantize_4bit(w, cfg)


def test_pack_layout_is_the_documented_byte_order():
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    p = pack_lut4(codes)
    assert p.shape == (3, 32) and p.dtype == torch.uint8
    for r in range(32 // 16):  # every run of 32 codes is 16 bytes: c[b] | c[16 + b] << 4
        for b in range(16):
            want = codes[:, 32 * r + b] | (codes[:, 32 * r + 16 + b] << 4)
            assert torch.equal(p[:, 16 * r + b], want)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("cfg,shape", [
    (BnbNF4Config(blocksize=64, double_quant=True), (48, 192)),
    (BnbFP4Config(blocksize=32), (40, 96)),
    (BnbNF4Config(blocksize=128), (24, 256)),
    (BnbNF4Config(blocksize=256), (30, 128)),  # a block spans two whole rows: block (2, 128)
])
def test_dequantize_is_bit_exact(cfg, shape, simd):
    qw = _qw(*shape, cfg)
    assert KERNEL.supports(qw, CPU) is None
    b = KERNEL.prepare(qw)
    assert torch.equal(lut4_dequantize(b["w"], b["s"], b["lut"], simd=simd), qw.dequantize())


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("m,n", [(1, 72), (1, 70), (2, 72), (4, 72), (5, 70), (9, 72)])
def test_matmul_within_float32_rounding(m, n, simd):
    # M = 1 runs four weight rows at a time (n = 70: two rows left over for the general loop)
    qw = _qw(n, 320, BnbNF4Config(blocksize=64))
    b = KERNEL.prepare(qw)
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m))
    y = lut4_mm(x, b["w"], b["s"], b["lut"], simd=simd, threads=1)
    exact = x.double() @ qw.dequantize().double().t()
    assert y.shape == (m, n)
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 2e-6


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 32, True), (3, 64, False), (2, 96, False),
                                            (4, -1, False)])
def test_integer_layouts_with_zero_points_are_bit_exact(bits, group, sym, simd):
    """Integer codes: the table is ``code - offset`` and each group's ``(table - zero) * scale`` is what the
    reference dequantization computes, value for value."""
    w = torch.randn(36, 192, generator=torch.Generator().manual_seed(bits)) * 0.05
    qw = rtn_quantize(w, RTNConfig(bits=bits, group_size=group, sym=sym))
    assert (qw.zero is None) == sym and KERNEL.supports(qw, CPU) is None
    b = KERNEL.prepare(qw)
    assert torch.equal(lut4_dequantize(b["w"], b["s"], b["lut"], b.get("z"), simd=simd), qw.dequantize())
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(0))
    exact = x.double() @ qw.dequantize().double().t()
    for m in (1, 3):
        y = lut4_mm(x[:m], b["w"], b["s"], b["lut"], b.get("z"), simd=simd, threads=1)
        assert ((y.double() - exact[:m]).abs().max() / exact.abs().max()).item() < 2e-6


def test_integer_layers_auto_choice():
    """With AVX-512, auto runs integer layouts here (faster than cpu-int4, float32 numerics); without it,
    the layouts cpu-int4 runs stay there and the rest (out_features not a multiple of 16) come here."""
    two = torch.nn.ModuleList([torch.nn.Linear(128, 40), torch.nn.Linear(128, 32)])
    q = polyquant.quantize(two, RTNConfig(bits=4, group_size=64, sym=False, include=["0", "1"]), show_progress=False)
    mods = dict(q.named_modules())
    assert mods["0"].kernel_name == "cpu-lut4"
    assert mods["1"].kernel_name == AUTO_INT4
    if AUTO_INT4 == "cpu-int4":
        assert "AVX-512" in mods["1"].kernel_skipped["cpu-lut4"]


@pytest.mark.parametrize("simd", SIMD)
def test_act_order_weights_sorted_once_input_gathered(simd):
    """GPTQ act-order (g_idx): the columns are sorted by group at prepare, the input gathered per call;
    the product equals the reference's in the original column order."""
    from polyquant.kernels.cpu_actorder import sort_by_group
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (40, 256), generator=g, dtype=torch.uint8)
    g_idx = (torch.arange(256) // 64)[torch.randperm(256, generator=g)].to(torch.int32)
    qw = QuantizedWeight.from_codes(codes, "uint4", (1, 64), torch.rand(40, 4, generator=g) * 0.01 + 1e-3,
                                    torch.randint(0, 16, (40, 4), generator=g).float(), g_idx)
    assert KERNEL.supports(qw, CPU) is None
    b = KERNEL.prepare(qw)
    sorted_qw, perm = sort_by_group(qw)
    assert torch.equal(b["perm"], perm)
    assert torch.equal(lut4_dequantize(b["w"], b["s"], b["lut"], b.get("z"), simd=simd), sorted_qw.dequantize())
    x = torch.randn(3, 256, generator=g)
    exact = x.double() @ qw.dequantize().double().t()
    for m in (1, 3):
        from polyquant.nn.quant_linear import QuantLinear
        y = QuantLinear(qw, None, kernel="cpu-lut4")(x[:m])
        assert ((y.double() - exact[:m]).abs().max() / exact.abs().max()).item() < 2e-6
    bad = QuantizedWeight.from_codes(codes, "uint4", (1, 64), torch.rand(40, 4), None,
                                     torch.zeros(256, dtype=torch.int32))  # every column in group 0
    assert "runs of group_size" in KERNEL.supports(bad, CPU)


def test_threads_give_the_same_result():
    qw = _qw(96, 256, BnbFP4Config(blocksize=64))
    b = KERNEL.prepare(qw)
    x = torch.randn(3, 256)
    y1 = lut4_mm(x, b["w"], b["s"], b["lut"], threads=1)
    y2 = lut4_mm(x, b["w"], b["s"], b["lut"], threads=2)
    assert torch.equal(y1, y2)  # rows are split between threads, each row's sum is computed the same way


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_model_picks_cpu_lut4_and_matches_reference(quant):
    m = tiny_llama()
    ids = torch.randint(0, 256, (2, DEQUANT_MIN_M + 3), generator=torch.Generator().manual_seed(3))
    q = polyquant.quantize(m, BnbNF4Config() if quant == "nf4" else BnbFP4Config(), show_progress=False)
    assert set(kernel_summary(q)) == {"cpu-lut4"}
    with torch.no_grad():
        fast_long, fast_one = q(ids).logits, q(ids[:, :1]).logits  # dequantize path and the C loop
        set_kernels(q, "reference")
        ref_long, ref_one = q(ids).logits, q(ids[:, :1]).logits
    assert sqnr_db(ref_long, fast_long) > 90 and sqnr_db(ref_one, fast_one) > 90
    assert fast_one.dtype == torch.float32


def test_bfloat16_activations():
    qw = _qw(64, 128, BnbNF4Config(blocksize=64))
    lin = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=True))
    with torch.no_grad():
        lin[0].weight.copy_(qw.dequantize())
    q = polyquant.quantize(lin, BnbNF4Config(include=["0"]), show_progress=False)
    x = torch.randn(2, 128).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        set_kernels(q, "reference")
        r = q(x)
    assert y.dtype == torch.bfloat16 and sqnr_db(r.float(), y.float()) > 40


def test_refusals_name_the_reason(monkeypatch):
    codes = torch.zeros(16, 48, dtype=torch.uint8)
    odd = QuantizedWeight.from_codes(codes, "nf4", (1, 48), torch.ones(16, 1))
    assert "multiple of 32" in KERNEL.supports(odd, CPU)
    short = QuantizedWeight.from_codes(torch.zeros(16, 96, dtype=torch.uint8), "nf4", (1, 64), torch.ones(16, 2))
    assert "row groups dividing" in KERNEL.supports(short, CPU)
    int8 = QuantizedWeight.from_codes(torch.zeros(16, 64, dtype=torch.uint8), "uint8", (1, 32), torch.ones(16, 2))
    assert "1- to 4-bit integer" in KERNEL.supports(int8, CPU)
    ok = QuantizedWeight.from_codes(torch.zeros(16, 64, dtype=torch.uint8), "nf4", (1, 32), torch.ones(16, 2))
    assert "cuda" in KERNEL.supports(ok, torch.device("cuda"))
    # no compiled library (disabled here, or no compiler): refused with the reason, auto takes the reference
    monkeypatch.setattr(cext, "_LIBS", {})
    monkeypatch.setenv("POLYQUANT_NO_CEXT", "1")
    assert "POLYQUANT_NO_CEXT" in KERNEL.supports(ok, CPU)
    kern, reasons = select_kernel(ok, CPU)
    assert kern.name == "reference" and "POLYQUANT_NO_CEXT" in reasons["cpu-lut4"]


def test_library_builds_into_a_fresh_cache_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    """The C file builds in a new cache folder (atomically: no temporary files left), a corrupt cached
    file is rebuilt, and a machine without a compiler gets a reason naming it instead of an exception."""
    monkeypatch.setenv("POLYQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cext, "_LIBS", {})
    assert cext.library_error("lut4") is None
    built = list((tmp_path / "cext").iterdir())
    assert len(built) == 1 and built[0].name.startswith("lut4-") and built[0].suffix == ".so"
    # a corrupt cached build (same name in another cache folder, never loaded in this process) is rebuilt
    corrupt = tmp_path / "corrupt" / "cext" / built[0].name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a shared library")
    monkeypatch.setenv("POLYQUANT_CACHE_DIR", str(tmp_path / "corrupt"))
    monkeypatch.setattr(cext, "_LIBS", {})
    assert cext.library_error("lut4") is None and corrupt.read_bytes()[:4] == b"\x7fELF"
    monkeypatch.setenv("POLYQUANT_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(cext, "_LIBS", {})
    monkeypatch.setattr(cext, "_compiler", lambda: None)
    assert "no C compiler" in cext.library_error("lut4")


def test_input_gradient_flows_like_the_reference():
    """The C loop has no autograd graph; an input that needs a gradient takes the differentiable
    dequantize + matmul path, so d(out)/d(x) equals the reference kernel's."""
    from polyquant.nn.quant_linear import QuantLinear
    qw = _qw(48, 128, BnbNF4Config(blocksize=64))
    fast, ref = QuantLinear(qw, None, kernel="cpu-lut4"), QuantLinear(qw, None, kernel="reference")
    x1 = torch.randn(1, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (fast(x1) ** 2).sum().backward()
    (ref(x2) ** 2).sum().backward()
    assert x1.grad is not None and torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
