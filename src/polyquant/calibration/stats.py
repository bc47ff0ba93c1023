"""Statistics collected from a Linear's calibration inputs (the driver feeds every input batch).

A method says what it needs with ``MethodSpec.collect``: a name from ``COLLECTORS``
(default ``"hessian"``) or a callable ``(linear) -> collector``. A collector has ``add(x)`` (x:
the Linear's input ``[..., in_features]``) and ``result() -> dict`` (handed to
``spec.quantize_weight`` as ``stats``). A collector whose class sets ``shareable = True`` depends
on the inputs only, so Linears fed the same tensor share one instance.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

__all__ = ["Collector", "HessianCollector", "COLLECTORS", "collector_factory"]


class Collector(Protocol):
    def add(self, x: torch.Tensor) -> None: ...

    def result(self) -> dict: ...


class HessianCollector:
    """GPTQ's Hessian ``H = 2/n * sum_x x x^T`` over the ``n`` input rows (tokens), kept as a
    running average in float32; ``result()`` is ``{"H": H, "n": n}``. Shareable: Linears that
    receive the very same input tensor (q/k/v, gate/up) share one collector."""

    shareable = True

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        # H <- n/(n+m) H + 2/(n+m) x^T x : one fused BLAS call, float32 even under autocast
        with torch.autocast(self.H.device.type, enabled=False):
            self.H.addmm_(x.t(), x, beta=self.n / total, alpha=2.0 / total)
        self.n = total

    def result(self) -> dict:
        return {"H": self.H, "n": self.n}


COLLECTORS: dict[str, Callable[[nn.Module], Collector]] = {
    "hessian": lambda lin: HessianCollector(lin.in_features, lin.weight.device),
}


def collector_factory(spec) -> Callable[[nn.Module], Collector]:
    """The collector constructor a method asks for (``spec.collect``)."""
    want = spec.collects()
    if callable(want):
        return want
    if want not in COLLECTORS:
        raise ValueError(f"method {spec.name!r} asks for unknown statistics {want!r}; "
                         f"known: {sorted(COLLECTORS)}")
    return COLLECTORS[want]
