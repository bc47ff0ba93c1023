"""Memory: bytes of stored weights, bytes resident at run time, the ideal size of the quantized
layers, and the process's peak resident set.

* ``weight_bytes``: what the weights occupy when stored: every parameter (float embeddings,
  norms, biases, an unquantized head) plus each ``QuantLinear``'s quantized weight tensors
  (codes, scales, zeros, act-order index, extras), each tensor counted once (tied weights share
  storage). Kernel-prepared buffers (``k_*``) and other buffers (rotary tables, position ids)
  are not weights.
* ``runtime_bytes``: everything resident in the model: all parameters and all buffers,
  including the kernels' prepared copies.
* ``weight_bytes_quantized_layers``: the quantized weights of the QuantLinear layers alone
  (``QuantizedWeight.nbytes()``, no bias); ``weight_bytes_ideal``: for the same layers,
  ``bits * out * in / 8`` plus scales and zeros at their stored dtype (no padding, no index,
  no extras), the floor the stored size is compared against.
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from polyquant.nn.quant_linear import QuantLinear

__all__ = ["weight_bytes", "runtime_bytes", "quantized_layer_bytes", "peak_rss_bytes", "memory_report"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sum_unique(tensors) -> int:
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (str(t.device), t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(t)
    return total


def _quantized_tensors(model: nn.Module):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qw = m.quantized_weight
            derived = qw.derived_fields()  # decoded from extras (SpQR's two-level statistics): not stored
            yield from (t for k, t in qw.tensors().items() if k not in derived)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights (parameters + quantized weight tensors, tied ones once)."""
    return _sum_unique([*model.parameters(), *_quantized_tensors(model)])


def runtime_bytes(model: nn.Module) -> int:
    """Bytes of everything resident in the model (parameters and all buffers, kernel buffers too)."""
    return _sum_unique([*model.parameters(), *model.buffers()])


def quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """``(stored, ideal)`` bytes of the QuantLinear layers' quantized weights (no bias)."""
    stored = ideal_bits = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            qw = m.quantized_weight
            stored += qw.nbytes()
            out, inp = qw.shape
            ideal_bits += qw.bits * out * inp
            ideal_bits += 8 * _nbytes(qw.scale)
            if qw.zero is not None:
                ideal_bits += 8 * _nbytes(qw.zero)
    return stored, (ideal_bits + 7) // 8


def peak_rss_bytes() -> int:
    """Peak resident set size of this *process* so far (not of one model): benchmarks run each
    configuration in its own process so that the number belongs to it.

    On Linux it is the memory map's high-water mark (``VmHWM`` of ``/proc/self/status``): the
    kernel's ``ru_maxrss`` also holds the resident size of the parent it was forked from, up to
    the ``exec`` (a child started by a 1.6 GB process reads at least 1.6 GB)."""
    hwm = vm_hwm_bytes("self")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """``VmHWM`` of process ``pid`` in bytes: its own memory map's high-water mark (None where
    ``/proc`` does not have it, or once the process has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_report(model: nn.Module) -> dict[str, int]:
    stored, ideal = quantized_layer_bytes(model)
    return {"weight_bytes": weight_bytes(model), "runtime_bytes": runtime_bytes(model),
            "weight_bytes_quantized_layers": stored, "weight_bytes_ideal": ideal}
