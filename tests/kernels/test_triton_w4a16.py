"""triton-w4a16 correctness in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against the
reference dequantize + matmul, at tiny shapes; plus its registration (CUDA only)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from helpers import compile_ahead, int_qweight  # noqa: E402

from polyquant.kernels import get_kernel, select_kernel  # noqa: E402
from polyquant.kernels.triton_w4a16 import prepare_w4a16, w4a16_matmul  # noqa: E402
from polyquant.nn import QuantLinear  # noqa: E402
from polyquant.tensor.quantized_weight import QuantizedWeight  # noqa: E402

# relative tolerance on max|y - ref| / max|ref|: output rounding of the dtype plus fp32 accumulation
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


_weight = int_qweight


def _check(qw, x, **launch):
    out, inp = qw.shape
    buf = prepare_w4a16(qw)
    gs = inp if qw.block[1] >= inp else qw.block[1]
    y = w4a16_matmul(x, buf, qw.bits, gs, qw.qt.code_offset, out, inp, **launch)
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert y.dtype == x.dtype and y.shape == (x.shape[0], out)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err < RTOL[x.dtype], err
    return buf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_decode_and_prefill_shapes(dtype, M):
    qw = _weight(48, 96, gs=32, sym=True)
    _check(qw, torch.randn(M, 96).to(dtype))


@pytest.mark.parametrize("sym,gs,act_order", [(False, 32, False), (True, -1, False), (True, 32, True),
                                              (False, 32, True), (True, 48, False)])
def test_layouts(sym, gs, act_order):
    qw = _weight(40, 96, gs=gs, sym=sym, act_order=act_order, seed=2)
    buf = _check(qw, torch.randn(3, 96, dtype=torch.float16))
    assert ("perm" in buf) == act_order and ("zeros" in buf) == (not sym)


@pytest.mark.parametrize("bits", [2, 8])
def test_other_bit_widths(bits):
    _check(_weight(32, 64, bits=bits, gs=32, sym=False, seed=bits), torch.randn(2, 64, dtype=torch.float16))


def test_split_k_and_unaligned_k_tiles():
    qw = _weight(32, 160, gs=32, sym=False, seed=4)  # 160 = 5 groups: the last K tile of 64 is partial
    x = torch.randn(2, 160, dtype=torch.float32)
    _check(qw, x, split_k=3, block_k=16)
    _check(qw, x, block_k=64)  # a 64-wide tile spans two groups: per-row scale gather


@pytest.mark.parametrize("sym,gs,act_order,bits", [(True, 32, False, 4), (False, 32, False, 4), (True, 32, True, 4),
                                                   (False, 48, True, 4), (True, -1, False, 4), (False, 32, False, 2),
                                                   (True, 32, False, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_dequantize_then_matmul_path(sym, gs, act_order, bits, dtype):
    from polyquant.kernels.triton_w4a16 import dequantize_w4a16
    qw = _weight(40, 96, bits=bits, gs=gs, sym=sym, act_order=act_order, seed=7)
    buf = prepare_w4a16(qw)
    gsz = 96 if gs == -1 else gs
    wt = dequantize_w4a16(buf, bits, gsz, qw.qt.code_offset, 40, 96, dtype)
    ref_w = qw.dequantize(torch.float32).T  # [K, N], original column order
    if "perm" in buf:
        ref_w = ref_w[buf["perm"].long()]
    assert wt.dtype == dtype
    if dtype == torch.float16:
        assert torch.equal(wt, ref_w.to(dtype))  # one rounding of the exact product
    else:  # Triton's interpreter truncates to bf16 where the GPU rounds to nearest: within one bf16 ulp
        assert bool(((wt.float() - ref_w).abs() <= ref_w.abs() * 2.0 ** -7).all())
    _check(qw, torch.randn(5, 96).to(dtype), dequant_min_m=1)


def test_irregular_gidx_uses_row_gather():
    qw = _weight(32, 64, gs=16, sym=True, act_order=True, seed=5)
    g = qw.g_idx.clone()
    g[g == 0] = 1  # uneven groups: sorting cannot make runs of 16
    qw = QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, None, g)
    buf = _check(qw, torch.randn(4, 64, dtype=torch.float16))
    assert "g_idx" in buf and "perm" not in buf
    _check(qw, torch.randn(4, 64, dtype=torch.float16), dequant_min_m=1)


def test_forward_through_quantlinear_glue():
    qw = _weight(32, 64, gs=32, sym=True, act_order=True, seed=6)
    bias = torch.randn(32)
    m = QuantLinear(qw, bias, kernel="reference")
    kern = get_kernel("triton-w4a16")
    for k, v in kern.prepare(qw).items():  # what set_kernel does on a GPU
        m.register_buffer(f"k_{k}", v, persistent=False)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    y = kern.forward(m, x)
    ref = m(x.float())
    assert y.shape == (2, 3, 32) and y.dtype == torch.float16
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 2e-3


def test_registered_for_cuda_only():
    qw = _weight(32, 64)
    kern = get_kernel("triton-w4a16")
    assert kern.devices == ("cuda",)
    assert "cuda" in kern.supports(qw, torch.device("cpu"))
    chosen, _ = select_kernel(qw, "cpu")
    assert chosen.name != "triton-w4a16"
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    nf4 = QuantizedWeight.from_codes(codes, "nf4", (1, 32), torch.rand(32, 2))
    assert "integer" in kern.supports(nf4, torch.device("cuda"))


_COMPILE_MATMUL = r"""
from polyquant.kernels import triton_w4a16 as tw
xdt, variant = sys.argv[2], sys.argv[3]
zero = variant.startswith("zero")
dec = "decode" in variant
k = build(tw._w4a16_kernel, {"x_ptr": f"*{xdt}", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp32",
                             "perm_ptr": "*i32", "gidx_ptr": "*i32", "y_ptr": f"*{xdt}"},
          dict(BITS=4, OFFSET=8, HAS_ZERO=zero, HAS_PERM=not zero, HAS_GIDX=zero, GROUP_ALIGNED=not zero,
               UPCAST=False, BLOCK_M=16 if dec else 64, BLOCK_N=64 if dec else 128, BLOCK_K=128 if dec else 32))
assert k.asm.get("cubin") and ("mma" in k.asm["ptx"])
print("ok")
"""

_COMPILE_DEQUANT = r"""
from polyquant.kernels import triton_w4a16 as tw
wdt, zero = sys.argv[2], sys.argv[3] == "1"
k = build(tw._dequant_kernel, {"q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp32", "gidx_ptr": "*i32",
                               "w_ptr": f"*{wdt}"},
          dict(BITS=4, OFFSET=8, HAS_ZERO=zero, HAS_GIDX=zero, BLOCK_K=32, BLOCK_N=128))
assert k.asm.get("cubin")
print("ok")
"""


@pytest.mark.parametrize("cap,xdt,variant", [(90, "bf16", "sym-aligned-decode"), (80, "fp16", "zero-gidx-prefill")])
def test_compiles_for_nvidia_targets_without_a_gpu(cap, xdt, variant):
    """The interpreter does not type-check like the compiler: compile ahead to a cubin for real
    targets (Triton's bundled LLVM and ptxas; no GPU or driver needed), in a fresh process where
    TRITON_INTERPRET is unset (in this one an interpreted kernel may have left triton patched)."""
    compile_ahead(_COMPILE_MATMUL, cap, xdt, variant)


@pytest.mark.parametrize("cap,wdt,zero", [(90, "bf16", False), (80, "fp16", True)])
def test_dequant_kernel_compiles_for_nvidia_targets(cap, wdt, zero):
    compile_ahead(_COMPILE_DEQUANT, cap, wdt, str(int(zero)))
