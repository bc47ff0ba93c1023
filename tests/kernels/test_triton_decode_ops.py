"""The fused decode-step ops (``kernels/triton_decode_ops.py``) in Triton's interpreter against the
PyTorch ops they replace, in float32 (to float32 rounding) and bf16 (to bf16 rounding)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import compile_ahead  # noqa: E402
from polyquant.kernels.triton_decode_ops import add_rms_norm, decode_ops_reason, rope_kv_write, silu_mul  # noqa: E402

TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, generator=g).to(dtype)
    d = torch.randn(1, 576, generator=g).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    want_x = x + d
    want = F.rms_norm(want_x.float(), (576,), w.float(), 1e-5)
    xs = x.clone()
    h = add_rms_norm(xs, w, 1e-5, d)
    # float32: exact; bf16: within one rounding (Triton 3.9's interpreter rounds fp32 -> bf16 towards zero)
    assert (torch.equal(xs, want_x) if dtype == torch.float32 else _rel(xs, want_x) < 8e-3) and h.dtype == dtype
    assert _rel(h, want) < TOL[dtype]
    h2 = add_rms_norm(x.clone(), w, 1e-5)
    assert _rel(h2, F.rms_norm(x.float(), (576,), w.float(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gu = torch.randn(1, 2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    g, u = gu[:, :1536], gu[:, 1536:]
    assert _rel(silu_mul(gu), F.silu(g) * u) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write(dtype):
    nh, nkv, hd, L = 8, 2, 64, 40
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, (nh + 2 * nkv) * hd, generator=gen).to(dtype)
    ang = torch.randn(L, hd // 2, generator=gen)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    kc = torch.zeros(nkv, L, hd, dtype=dtype)
    vc = torch.zeros(nkv, L, hd, dtype=dtype)
    pos = torch.tensor([17])
    q = rope_kv_write(qkv, cos, sin, pos, kc, vc, nh, nkv)

    def rope(x):
        h = x.shape[-1] // 2
        return x.float() * cos[17].float() + torch.cat((-x[..., h:], x[..., :h]), -1).float() * sin[17].float()

    qq, kk, vv = qkv.view(-1, hd).split([nh, nkv, nkv])
    assert _rel(q, rope(qq)) < TOL[dtype]
    assert _rel(kc[:, 17], rope(kk)) < TOL[dtype]
    assert torch.equal(vc[:, 17], vv)
    assert kc[:, :17].abs().sum() == 0 and kc[:, 18:].abs().sum() == 0 and vc[:, 18:].abs().sum() == 0


def test_reason(monkeypatch):
    assert decode_ops_reason(torch.device("cpu")) is None  # the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in decode_ops_reason(torch.device("cpu"))


_COMPILE = r"""
from polyquant.kernels import triton_decode_ops as ops
for d in (True, False):
    assert build(ops._add_rms_norm_kernel, {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16",
                                            "eps": "fp32"}, dict(HAS_DELTA=d, BLOCK=4096)).asm.get("cubin")
assert build(ops._silu_mul_kernel, {"gu_ptr": "*bf16", "y_ptr": "*bf16"}, dict(BLOCK=1024)).asm.get("cubin")
assert build(ops._rope_kv_kernel, {"qkv_ptr": "*bf16", "q_out_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                                   "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64"},
             dict(HD=128, HALF=64)).asm.get("cubin")
print("ok")
"""


@pytest.mark.parametrize("cap", [80, 90])
def test_decode_ops_compile_for_nvidia_targets_without_a_gpu(cap):
    compile_ahead(_COMPILE, cap)
