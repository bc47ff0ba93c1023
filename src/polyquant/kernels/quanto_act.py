"""optimum-quanto's static activation quantization (``QModuleMixin.quantize_input`` with
``input_scale``), its calibration rule (``optimum.quanto.Calibration``), and the calibration pass.

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
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from polyquant.kernels.base import Kernel, register_kernel

__all__ = ["QuantoActivation", "QuantoInt8Kernel", "calibrate_activations", "ACT_QTYPES"]

ACT_QTYPES = {"qint8": 127.0, "qfloat8": float(torch.finfo(torch.float8_e4m3fn).max)}


class QuantoActivation(nn.Module):
    """Static per-tensor activation quantization with quanto's scale rule.

    Args:
        qtype: ``qint8`` or ``qfloat8``.
        input_scale / output_scale: calibrated scalar scales (None: not calibrated yet).
        momentum: calibration momentum.
    """

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

    def extra_repr(self) -> str:
        s = "uncalibrated" if self.input_scale is None else f"input_scale={float(self.input_scale):.4g}"
        return f"{self.qtype}, static per-tensor, {s}"


@contextlib.contextmanager
def _calibrating(rules: list[tuple[nn.Module, QuantoActivation]],
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


def _parents(model: nn.Module, rules: list[tuple[nn.Module, QuantoActivation]]
             ) -> list[tuple[nn.Module, list[QuantoActivation]]]:
    """The direct parent of each calibrated module, with the rules of its calibrated children."""
    by_module = {id(m): r for m, r in rules}
    out = []
    for parent in model.modules():
        children = [by_module[id(c)] for c in parent.children() if id(c) in by_module]
        if children:
            out.append((parent, children))
    return out


def calibrate_activations(model: nn.Module, calibration: Any, show_progress: bool = False) -> int:
    """Run ``calibration`` (token windows, see :func:`polyquant.calibration.data.as_samples`) through
    ``model`` and update every :class:`QuantoActivation`'s input/output scales with quanto's rule.
    Returns the number of layers calibrated."""
    from polyquant.calibration import Calibration
    from polyquant.calibration.data import as_samples
    from polyquant.progress import progress

    if isinstance(calibration, Calibration):
        calibration = calibration.samples
    samples = as_samples(calibration)
    rules = [(m, m.act_quant) for m in model.modules() if isinstance(getattr(m, "act_quant", None), QuantoActivation)]
    if not rules:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _calibrating(rules, _parents(model, rules)):
            for s in progress(samples, desc="quanto calibration", enabled=show_progress):
                model(**{k: v.to(device) for k, v in s.items()}, use_cache=False)
    finally:
        model.train(was_training)
    missing = [type(m).__name__ for m, r in rules if not r.calibrated]
    if missing:
        warnings.warn(f"{len(missing)} layer(s) saw no calibration input and keep dynamic activation scales",
                      stacklevel=2)
    return len(rules)


class QuantoInt8Kernel(Kernel):
    """int8 weights x optimum-quanto's static qint8 activations as quanto runs them on CPU
    (``qbytes_int_mm``): ``torch._int_mm`` of the int8 codes (exact int32 sums), then
    ``acc.float() * (s_x * s_w)``, cast to the output dtype, plus bias. Layers whose rule is qfloat8
    take the ``cpu-int8`` path on the fake-quantized input."""

    name = "quanto-int8"
    devices = ("cpu",)
    priority = 25
    layouts = "8-bit symmetric per-channel weights with quanto's static qint8 activations (int8 x int8)"
    act_rule = QuantoActivation

    def supports(self, qw, device):
        if r := self._device_reason(device):
            return r
        from polyquant.kernels.int8_dynamic import symmetric_int8_reason
        return symmetric_int8_reason(qw, ((1, qw.shape[1]),))

    def prepare(self, qw):
        from polyquant.kernels.int8_dynamic import int8_codes
        s = qw.scale[:, 0].float().contiguous()
        return {"w": int8_codes(qw), "s": s.to(torch.bfloat16), "sf": s}  # w, s: the cpu-int8 buffers (qfloat8 path)

    def forward(self, module, x):
        rule = module.act_quant
        if not isinstance(rule, QuantoActivation) or rule.qtype != "qint8":
            from polyquant.kernels.cpu import CpuInt8Kernel
            return CpuInt8Kernel.forward(self, module, x)
        from polyquant.kernels.int8_dynamic import int8_mm
        b = module._buffers
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        q, xs = rule.quantize(x2)
        scales = xs * b["k_sf"]  # quanto: input._scale * weight._scale
        y = (int8_mm(q, b["k_w"]).to(torch.float32) * scales).to(scales.dtype).to(dtype)
        if module.bias is not None:
            y = y + module.bias.to(dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


register_kernel(QuantoInt8Kernel)
