"""optimum-quanto's static activation quantization (``QModuleMixin.quantize_input`` with
``input_scale``), and its calibration rule (``optimum.quanto.Calibration``: :func:`calibrating` updates the scales of
the rules while a model runs; the pass over calibration data is
:func:`polyquant.calibration.activations.calibrate_activations`). The ``quanto-int8`` kernel runs
the qint8 rule as an int8 x int8 product.

A layer's input is quantized per tensor with a *static* scale: ``qint8``:
``q = clamp(round(x / s), -128, 127)``; ``qfloat8`` (e4m3fn): ``q = clamp(x / s, -448, 448)`` cast
to float8; the layer then computes with ``q * s`` (fake quantization: the same sum quanto's int8 /
float8 matmul forms, up to float rounding of the accumulation).

Calibration (quanto's rule): for every batch, ``new = max|x| / qmax`` (127 or 448, in the input's
dtype); the first batch sets the scale, later ones update it as ``momentum * s + (1 - momentum) *
new`` (momentum 0.9). Output scales (``output_scale``) are calibrated the same way on the layer's
output (before it is quantized) and saved for quanto.

Output quantization during calibration, as quanto 0.2.7 does it: every quantized module starts with
its output-quantization hook on, so its output is fake-quantized with the just-updated
``output_scale`` until its *parent* module's forward returns for the first time inside
``Calibration``, which then removes the hook unless the "streamline" trace saw an operation keep
the output quantized. That trace never fires in 0.2.7 (``Calibration.__torch_function__`` tests
``QTensor in types``, but ``types`` holds the concrete ``ActivationQBytesTensor``), so in practice
every layer's output is quantized during the *first* calibration batch only - which, with momentum
0.9 over 8 batches, still weighs ~48% in the final scales of every later layer. polyquant
reproduces this (``QuantoActivation.quantize_outputs``, cleared per layer when its parent
returns), so its scales equal quanto's on the same data; after calibration neither quantizes
outputs. Differences left: quanto's ``calibrate_input`` always uses momentum 0.9 (its hook's
default argument) whatever ``Calibration(momentum=...)`` says, while polyquant uses ``momentum`` for
both; and quanto restarts the average whenever a scale equals exactly 1.0.

Before calibration (no ``input_scale``) the rule uses a dynamic per-tensor scale ``max|x| / qmax``
of each call (quanto itself would use its initial scale of 1.0, i.e. plain rounding of x).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from polyquant.activations.base import ActivationQuantizer, ActRule, register_act_rule

__all__ = ["QuantoActivation", "ACT_QTYPES", "calibrating", "parents"]

ACT_QTYPES = {"qint8": 127.0, "qfloat8": float(torch.finfo(torch.float8_e4m3fn).max)}


@register_act_rule
class QuantoActivation(ActivationQuantizer):
    """Static per-tensor activation quantization with quanto's scale rule.

    Args:
        qtype: ``qint8`` or ``qfloat8``.
        input_scale / output_scale: calibrated scalar scales (None: not calibrated yet).
        momentum: calibration momentum.
    """

    kind = "quanto"

    def __init__(self, qtype: str, input_scale: torch.Tensor | None = None,
                 output_scale: torch.Tensor | None = None, momentum: float = 0.9) -> None:
        super().__init__()
        if qtype not in ACT_QTYPES:
            raise ValueError(f"activations must be one of {sorted(ACT_QTYPES)}, got {qtype!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.qtype = qtype
        self.momentum = float(momentum)
        self.calibrating = False
        # quanto's output-quantization hook: on until calibration sees the parent module return (module doc)
        self.quantize_outputs = True
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().reshape(()))
        self.register_buffer("output_scale", None if output_scale is None else output_scale.detach().reshape(()))

    @property
    def qmax(self) -> float:
        return ACT_QTYPES[self.qtype]

    @property
    def calibrated(self) -> bool:
        return self.input_scale is not None

    @property
    def scale(self) -> torch.Tensor | None:
        """The static input scale (None until calibrated); loaders keep a rule that carries one."""
        return self.input_scale

    def _update(self, name: str, t: torch.Tensor) -> None:
        new = t.detach().abs().amax() / self.qmax
        old = getattr(self, name)
        value = new if old is None else self.momentum * old + new * (1.0 - self.momentum)
        setattr(self, name, value.detach().reshape(()))

    def observe_output(self, y: torch.Tensor) -> None:
        self._update("output_scale", y)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._update("input_scale", x)
        s = self.input_scale if self.input_scale is not None else x.detach().abs().amax() / self.qmax
        return s.to(x.device)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qint8: the int8 codes ``clamp(round(x / s), -128, 127)`` and the scalar scale ``s`` (the
        scale is updated first while calibrating) - what :meth:`forward` fake-quantizes and what
        quanto feeds its int8 x int8 product."""
        if self.qtype != "qint8":
            raise ValueError(f"int8 codes need qint8 activations, not {self.qtype}")
        s = self._scale(x)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(x / safe), -128, 127).to(torch.int8), s

    def fake_quantize(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x`` quantized per tensor with scale ``s`` and dequantized (quanto's ``quantize_symmetric``
        then ``scale * data``)."""
        s = s.to(x.device)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        y = x / safe
        if self.qtype == "qint8":
            q = torch.clamp(torch.round(y), -128, 127)
        else:
            q = y.clamp(-self.qmax, self.qmax).to(torch.float8_e4m3fn).to(y.dtype)
        return (q * s).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(x, self._scale(x))

    @property
    def rule(self) -> ActRule:
        return ActRule(self.kind, "int8" if self.qtype == "qint8" else "float8_e4m3fn", "tensor",
                       dynamic=not self.calibrated, recipe="quanto",
                       options=(("momentum", repr(self.momentum)), ("qtype", self.qtype)))

    @classmethod
    def from_rule(cls, rule: ActRule, input_scale: torch.Tensor | None = None,
                  output_scale: torch.Tensor | None = None, **tensors) -> "QuantoActivation":
        return cls(rule.option("qtype", "qint8"), input_scale, output_scale, float(rule.option("momentum", "0.9")))

    def extra_repr(self) -> str:
        s = "uncalibrated" if self.input_scale is None else f"input_scale={float(self.input_scale):.4g}"
        return f"{self.qtype}, static per-tensor, {s}"


@contextlib.contextmanager
def calibrating(rules: list[tuple[nn.Module, QuantoActivation]],
                 parents: list[tuple[nn.Module, list[QuantoActivation]]] = ()) -> Iterator[None]:
    """Calibration mode: input scales update in the rules, output scales in a forward hook that also
    fake-quantizes the output while the rule's ``quantize_outputs`` is on; when a module of
    ``parents`` returns, its children's rules stop quantizing outputs (quanto's first-batch rule)."""
    hooks = []

    def on_output(mod, args, out, rule):
        rule.observe_output(out)
        if rule.quantize_outputs and isinstance(out, torch.Tensor):
            return rule.fake_quantize(out, rule.output_scale)
        return None

    def on_parent(mod, args, out, children):
        for r in children:
            r.quantize_outputs = False

    try:
        for module, rule in rules:
            rule.calibrating = True
            hooks.append(module.register_forward_hook(lambda m, a, o, rule=rule: on_output(m, a, o, rule)))
        for parent, children in parents:
            hooks.append(parent.register_forward_hook(lambda m, a, o, ch=children: on_parent(m, a, o, ch)))
        yield
    finally:
        for module, rule in rules:
            rule.calibrating = False
        for h in hooks:
            h.remove()


def parents(model: nn.Module, rules: list[tuple[nn.Module, QuantoActivation]]
             ) -> list[tuple[nn.Module, list[QuantoActivation]]]:
    """The direct parent of each calibrated module, with the rules of its calibrated children."""
    by_module = {id(m): r for m, r in rules}
    out = []
    for parent in model.modules():
        children = [by_module[id(c)] for c in parent.children() if id(c) in by_module]
        if children:
            out.append((parent, children))
    return out
