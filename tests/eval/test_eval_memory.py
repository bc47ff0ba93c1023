"""Weight bytes (stored), runtime bytes, ideal size of the quantized layers, peak RSS."""
from __future__ import annotations

import polyquant
from helpers import tiny_llama
from polyquant.eval import memory_report, peak_rss_bytes, runtime_bytes, weight_bytes

# tiny_llama(hidden=64, layers=2, vocab=256): head_dim 16, 2 KV heads -> k/v out 32, intermediate 128
V, H, KV, I, L = 256, 64, 32, 128, 2
LINEARS = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]  # (out, in) per layer
FLOAT_PER_LAYER = 2 * H  # two RMSNorms
EMBED = V * H
FINAL_NORM = H


def test_fp32_weight_bytes_counts_tied_head_once():
    linear = sum(o * i for o, i in LINEARS)
    expected = 4 * (EMBED + L * (linear + FLOAT_PER_LAYER) + FINAL_NORM)
    assert weight_bytes(tiny_llama(tie=True)) == expected
    assert weight_bytes(tiny_llama(tie=False)) == expected + 4 * V * H  # an untied head is its own tensor


def _rtn_w4_g32_expected(sym: bool) -> tuple[int, int]:
    """Hand count for RTN W4 g32: int32 words of 8 codes + fp32 scales (+ fp32 zeros if asym)."""
    q = 0
    for o, i in LINEARS:
        words = o * (i * 4 // 32)
        groups = o * (i // 32)
        q += 4 * words + 4 * groups + (0 if sym else groups * 4)
    q *= L
    floats = 4 * (EMBED + L * FLOAT_PER_LAYER + FINAL_NORM)  # embeddings (= tied head), norms
    return q, floats


def test_rtn_w4_g32_weight_bytes_exact():
    for sym in (True, False):
        model = polyquant.quantize(tiny_llama(), polyquant.RTNConfig(bits=4, group_size=32, sym=sym),
                                   show_progress=False)
        qbytes, floats = _rtn_w4_g32_expected(sym)
        rep = memory_report(model)
        assert rep["weight_bytes"] == qbytes + floats
        assert rep["weight_bytes_quantized_layers"] == qbytes
        assert rep["weight_bytes_ideal"] == qbytes  # 4-bit codes pack without padding here
        # runtime adds the kernels' prepared buffers and the rotary tables, never less
        # (a kernel buffer that is a stored tensor itself - e.g. float32 scales used as they are - is counted once)
        stored = {b.untyped_storage().data_ptr() for n, b in model.named_buffers()
                  if n.rsplit(".", 1)[-1].startswith("qw_")}
        k_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                      if n.rsplit(".", 1)[-1].startswith("k_") and b.untyped_storage().data_ptr() not in stored)
        rot = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
        assert k_bytes > 0
        assert rep["runtime_bytes"] == rep["weight_bytes"] + k_bytes + rot
        assert runtime_bytes(model) == rep["runtime_bytes"]


def test_ideal_excludes_padding():
    """A row whose codes do not fill the last int32 word: stored > ideal by the padding."""
    import torch
    from torch import nn

    from polyquant.tensor.quantized_weight import QuantizedWeight
    codes = torch.randint(0, 8, (16, 40), dtype=torch.uint8)   # 40 * 3 = 120 bits -> 4 words (128 bits)
    qw = QuantizedWeight.from_codes(codes, "uint3", (1, 40), torch.ones(16, 1), torch.zeros(16, 1))
    ql = polyquant.QuantLinear(qw, kernel="reference")
    m = nn.Sequential(ql)
    rep = memory_report(m)
    assert rep["weight_bytes_quantized_layers"] == 16 * 4 * 4 + 16 * 4 + 16 * 4
    assert rep["weight_bytes_ideal"] == (16 * 40 * 3) // 8 + 16 * 4 + 16 * 4
    assert rep["weight_bytes"] == rep["weight_bytes_quantized_layers"]


def test_peak_rss_is_process_peak():
    peak = peak_rss_bytes()
    with open("/proc/self/status") as f:  # the kernel's own high-water mark, in KiB
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert abs(peak - hwm) < 4 << 20      # same number, up to the kernel's lazy counter sync
    assert peak > 50 << 20                # python + torch: bytes, not KiB


def test_peak_rss_of_a_child_is_its_own_not_the_parents():
    """ru_maxrss of a process carries the resident size of the parent it was forked from; the
    peak polyquant reports (benchmarks run one configuration per child process) must not."""
    import subprocess
    import sys
    ballast = bytearray(700 << 20)  # the parent holds 700 MB more than any child needs
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = ("import resource; from polyquant.eval.memory import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    del ballast
    own, kernel = int(out[-2]), int(out[-1])
    with open("/proc/self/status") as f:
        parent = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    # ru_maxrss (``kernel``) reads above 700 MB here; the process's own high-water mark does not
    assert own < parent - (500 << 20), (own, kernel, parent)
