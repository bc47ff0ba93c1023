"""The kernel interface and the dispatch table.

A kernel computes ``y = x @ dequantize(W).T + b`` for the quantized layouts it supports. It says
*why* it cannot take a layout (``supports`` returns a reason, or None when it can), prepares its
own buffers once (``prepare``), and runs (``forward``). ``select_kernel`` walks the table in
priority order for a device; the choice is explicit and recorded on the module, never silent.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from polyquant.tensor.quantized_weight import QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from polyquant.nn.quant_linear import QuantLinear

__all__ = ["Kernel", "register_kernel", "get_kernel", "list_kernels", "select_kernel", "KERNELS"]


class Kernel:
    """Base class. Subclasses set ``name``, ``devices``, ``priority`` (higher wins), ``layouts``
    (one line for the compatibility matrix) and implement the three methods."""

    name: str = ""
    devices: tuple[str, ...] = ()
    priority: int = 0
    layouts: str = ""
    fast: bool = True
    min_capability: tuple[int, int] | None = None
    # A kernel that computes an activation rule natively (e.g. int8 x int8 with per-token dynamic
    # activations) names the rule's class here: ``auto`` offers it only to layers whose
    # ``act_quant`` is such a rule (an explicit request still gets it).
    act_rule: type | tuple[type, ...] | None = None

    def supports(self, qw: QuantizedWeight, device: torch.device) -> str | None:
        """None when this kernel can run ``qw`` on ``device``; otherwise the reason it cannot."""
        raise NotImplementedError

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Kernel-specific buffers, built once (e.g. a packed tile layout)."""
        return {}

    def forward(self, module: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device_reason(self, device: torch.device) -> str | None:
        if device.type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, not {device.type}"
        return None


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel | Callable[[], Kernel]) -> Kernel:
    k = kernel() if isinstance(kernel, type) else kernel
    if not k.name or k.name in KERNELS:
        raise ValueError(f"kernel name {k.name!r} is empty or already registered")
    KERNELS[k.name] = k
    return k


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(sorted(KERNELS))}") from None


def list_kernels() -> list[Kernel]:
    return sorted(KERNELS.values(), key=lambda k: (-k.priority, k.name))


def select_kernel(qw: QuantizedWeight, device: torch.device | str, requested: str = "auto",
                  act_quant: object = None) -> tuple[Kernel, dict[str, str]]:
    """Pick the kernel. ``requested='auto'``: the highest-priority kernel that supports the layout
    on the device (kernels with an ``act_rule`` only for layers whose ``act_quant`` is that rule);
    otherwise exactly the named kernel (ValueError with the reason if it cannot).
    Returns the kernel and, for auto, why each faster kernel was passed over."""
    device = torch.device(device)
    if requested != "auto":
        k = get_kernel(requested)
        reason = k.supports(qw, device)
        if reason:
            raise ValueError(f"kernel {requested!r} cannot run this layer: {reason}")
        return k, {}
    skipped: dict[str, str] = {}
    for k in list_kernels():
        if k.act_rule is not None and not isinstance(act_quant, k.act_rule):
            continue  # a different computation (its activation rule), not a faster kernel passed over
        reason = k.supports(qw, device)
        if reason is None:
            return k, skipped
        if k._device_reason(device) is None:
            skipped[k.name] = reason
    raise ValueError(f"no kernel supports {qw!r} on {device}")  # the reference kernel takes all
