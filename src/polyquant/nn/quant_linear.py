"""``QuantLinear``: a Linear whose weight is a ``QuantizedWeight``, run by an explicitly chosen kernel.

The quantized weight's tensors are buffers (they follow ``.to(device)``); the kernel's own
prepared buffers are non-persistent and rebuilt by :meth:`QuantLinear.set_kernel`. Both keep their
dtype through module-wide dtype casts (``model.to(torch.bfloat16)``, ``.half()``): an fp8 code, an
fp16 scale or an fp32 absmax is part of the format, so only the bias and the computation follow
the cast. ``repr`` shows the qtype, the block and the kernel in use.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from polyquant.kernels import select_kernel
from polyquant.kernels.base import Kernel
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["QuantLinear"]

_MISSING = object()


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear``.

    Args:
        qweight: the quantized weight ``[out, in]``.
        bias: optional float bias.
        kernel: ``auto`` or a kernel name.
        act_quant: optional activation quantizer applied to the input (e.g. dynamic int8/fp8).
        method: name of the method that produced it (for ``repr`` and reports).
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 act_quant: Callable[[torch.Tensor], torch.Tensor] | None = None, method: str = "") -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        tensors = qweight.tensors()
        self._meta = {"qtype": qweight.qtype, "shape": qweight.shape, "block": qweight.block,
                      "extras": sorted(qweight.extras), "tensors": tuple(tensors)}
        for k, v in tensors.items():
            self.register_buffer(f"qw_{k}", v)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act_quant = act_quant
        self.method = method
        self.kernel: Kernel | None = None
        self.kernel_skipped: dict[str, str] = {}
        self._kernel_request = kernel
        self.set_kernel(kernel, _qweight=qweight)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        m = self._meta
        return QuantizedWeight.from_tensors(m["qtype"], m["shape"], m["block"],
                                            {k: getattr(self, f"qw_{k}") for k in m["tensors"]})

    @property
    def kernel_name(self) -> str:
        return self.kernel.name if self.kernel else "none"

    def set_kernel(self, kernel: str = "auto", _qweight: QuantizedWeight | None = None) -> str:
        """(Re)select the kernel for the current device and rebuild its buffers."""
        # the weight this layer was built from (same tensors) may still hold its unpacked codes
        qw = _qweight if _qweight is not None else self.quantized_weight
        chosen, skipped = select_kernel(qw, self.qw_data.device, kernel, act_quant=self.act_quant)
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("k_")]:
            delattr(self, name)
        for k, v in chosen.prepare(qw).items():
            self.register_buffer(f"k_{k}", v, persistent=False)
        self.kernel, self.kernel_skipped, self._kernel_request = chosen, skipped, kernel
        return chosen.name

    def _apply(self, fn, recurse=True):
        """Module-wide casts move the quantized and kernel buffers between devices but never change
        their dtype; a dtype-preserving ``fn`` (``share_memory_``, a device move) applies as is."""
        probes = [torch.empty(0, dtype=d, device=self.qw_data.device) for d in (torch.float32, torch.float16)]
        moved = [fn(t) for t in probes]
        keeps_dtype = all(m.dtype == t.dtype for m, t in zip(moved, probes))
        device = moved[0].device
        own = {n: b for n, b in self._buffers.items() if b is not None and n.startswith(("qw_", "k_"))}
        for n in own:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, b in own.items():
                self._buffers[n] = fn(b) if keeps_dtype else b.to(device)
        return self

    def kbuf(self, name: str, default=_MISSING):
        t = getattr(self, f"k_{name}", None)
        if t is None:
            if default is _MISSING:
                raise KeyError(f"kernel buffer {name!r} missing")
            return default
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.forward(self, x)

    @property
    def weight(self) -> torch.Tensor:
        """Dense dequantized weight (for code that inspects ``.weight``; not used by kernels)."""
        return self.quantized_weight.dequantize(self.qw_scale.dtype if self.qw_scale.is_floating_point()
                                                else torch.float32)

    def extra_repr(self) -> str:
        m = self._meta
        g = "per-channel" if m["block"][1] >= self.in_features and m["block"][0] == 1 else f"block={m['block']}"
        act = ", act-quant" if self.act_quant is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={m['qtype']}, {g}{act}, kernel={self.kernel_name}")
