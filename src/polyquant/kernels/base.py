"""The kernel interface and the dispatch table.

A kernel computes ``y = x @ dequantize(W).T + b`` for the quantized layouts it supports. It says
*why* it cannot take a layout (``supports`` returns a reason, or None when it can), prepares its
own buffers once (``prepare``), and runs (``forward``). ``select_kernel`` walks the table in
priority order for a device; the choice is explicit and recorded on the module, never silent.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from polyquant.activations.base import rule_of
from polyquant.registry import add_entry, instance, lookup
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["Kernel", "register_kernel", "get_kernel", "list_kernels", "select_kernel", "KERNELS",
           "layer_rows", "layer_output"]


class Kernel:
    """Base class. Subclasses set ``name``, ``devices``, ``priority`` (higher wins), ``layouts``
    (one line for the compatibility matrix) and implement ``check`` (the layout conditions;
    ``supports`` adds the device), ``prepare`` and ``forward``."""

    name: str = ""
    devices: tuple[str, ...] = ()
    priority: int = 0
    layouts: str = ""
    fast: bool = True
    min_capability: tuple[int, int] | None = None
    # A kernel that computes an activation rule natively (e.g. int8 x int8 with per-token dynamic
    # activations) describes the rules it runs: patterns of ``ActRule`` fields (``{"kind":
    # "int8-dynamic"}``); ``auto`` offers it only to layers whose ``act_quant`` matches one (an
    # explicit request still gets it). Empty: the kernel does not depend on the activation rule.
    act_rules: tuple[dict[str, Any], ...] = ()

    def runs_act(self, act_quant: object) -> bool:
        """Whether ``auto`` may pick this kernel for a layer with this activation rule."""
        if not self.act_rules:
            return True
        rule = rule_of(act_quant)
        return rule is not None and any(rule.matches(p) for p in self.act_rules)

    # Layout families this kernel runs (``QuantizedWeight.layout``: scalar, ternary, vector) and
    # whether it adds sparse outliers itself; ``select_kernel`` refuses the rest before ``supports``.
    # Whether a forward can be recorded in a CUDA graph (no host synchronisation, no shapes or
    # launches that depend on the data); ``graph_unsafe_reason`` says why not.
    graph_safe: bool = True
    graph_unsafe_reason: str = ""

    layout_kinds: tuple[str, ...] = ("scalar", "ternary")
    sparse_outliers: bool = False

    def layout_reason(self, qw: QuantizedWeight) -> str | None:
        """Why this kernel's layout families exclude ``qw`` (None when they include it)."""
        if qw.layout not in self.layout_kinds:
            return f"{qw.layout} codes are not supported ({self.name} runs {'/'.join(self.layout_kinds)})"
        if qw.outliers is not None and not self.sparse_outliers:
            return "sparse outliers are not supported"
        return None

    def supports(self, qw: QuantizedWeight, device: torch.device) -> str | None:
        """None when this kernel can run ``qw`` on ``device``; otherwise the reason it cannot: a
        device outside ``devices``, else what ``check`` says."""
        return self._device_reason(device) or self.check(qw, device)

    def check(self, qw: QuantizedWeight, device: torch.device) -> str | None:
        """A subclass's own conditions on the layout (``device`` is one of ``devices``): None when
        it runs ``qw``, else why not."""
        return None

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Kernel-specific buffers, built once (e.g. a packed tile layout)."""
        return {}

    def forward(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device_reason(self, device: torch.device) -> str | None:
        if device.type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, not {device.type}"
        return None

    def _capability_reason(self, device: torch.device) -> str | None:
        """On a CUDA device below ``min_capability``: why not (None otherwise)."""
        if self.min_capability is not None and device.type == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(device)
            if cap < self.min_capability:
                return f"needs compute capability >= {self.min_capability}, got {cap}"
        return None


# -- a forward's input and output (kernels on the decode hot path call these: keep them lean) -------
def layer_rows(module: Any, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's input as a kernel takes it: ``(x, x2, xc)`` with ``x`` after the layer's activation
    quantizer (when it has one; its shape and dtype are the output's), ``x2`` its ``[rows, in]`` view
    and ``xc`` those rows in the kernel's compute ``dtype`` (``x2`` itself when it is already)."""
    if module.act_quant is not None:
        x = module.act_quant(x)
    x2 = x.reshape(-1, x.shape[-1])
    return x, x2, (x2 if x2.dtype == dtype else x2.to(dtype))


def layer_output(module: Any, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[rows, out]`` result as the layer's output for input ``x``: cast to ``x``'s dtype
    (when it differs), the bias added, ``x``'s leading dimensions restored."""
    dtype = x.dtype
    if y.dtype != dtype:
        y = y.to(dtype)
    if module.bias is not None:
        y = y + module.bias.to(dtype)
    return y.view(*x.shape[:-1], y.shape[-1]) if x.dim() != 2 else y


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel | Callable[[], Kernel]) -> Kernel:
    k = instance(kernel)
    return add_entry(KERNELS, k.name, k, "kernel")


def get_kernel(name: str) -> Kernel:
    return lookup(KERNELS, name, "kernel")


def list_kernels() -> list[Kernel]:
    return sorted(KERNELS.values(), key=lambda k: (-k.priority, k.name))


def select_kernel(qw: QuantizedWeight, device: torch.device | str, requested: str = "auto",
                  act_quant: object = None) -> tuple[Kernel, dict[str, str]]:
    """Pick the kernel. ``requested='auto'``: the highest-priority kernel that supports the layout
    on the device (kernels with ``act_rules`` only for layers whose ``act_quant`` matches one);
    otherwise exactly the named kernel (ValueError with the reason if it cannot).
    Returns the kernel and, for auto, why each faster kernel was passed over."""
    device = torch.device(device)
    if requested != "auto":
        k = get_kernel(requested)
        reason = k.layout_reason(qw) or k.supports(qw, device)
        if reason:
            raise ValueError(f"kernel {requested!r} cannot run this layer: {reason}")
        return k, {}
    skipped: dict[str, str] = {}
    for k in list_kernels():
        if not k.runs_act(act_quant):
            continue  # a different computation (its activation rule), not a faster kernel passed over
        reason = k.layout_reason(qw) or k.supports(qw, device)
        if reason is None:
            return k, skipped
        if k._device_reason(device) is None:
            skipped[k.name] = reason
    raise ValueError(f"no kernel supports {qw!r} on {device}")  # the reference kernel takes all
