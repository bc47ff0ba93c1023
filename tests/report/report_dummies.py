"""A throw-away method (and kernel) registered by the report tests to see the generated tables and
diagrams follow the registries."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from polyquant.kernels.base import KERNELS, Kernel, register_kernel
from polyquant.methods.base import MethodConfig
from polyquant.methods.registry import MethodSpec, register_method, unregister_method
from polyquant.methods.rtn import RTNConfig, rtn_quantize

DUMMY = "dummy-ternaryish"


@dataclass
class DummyConfig(MethodConfig):
    bits: int = 2
    group_size: int = 64

    def describe(self) -> str:
        return f"dummy w{self.bits} g{self.group_size}"


def _quantize(weight, config, stats):
    return rtn_quantize(weight, RTNConfig(bits=config.bits, group_size=config.group_size), stats)


def _broken(weight, config, stats):
    raise RuntimeError("dummy quantizer exploded")


@contextlib.contextmanager
def dummy_method(name: str = DUMMY, broken: bool = False, activations: str = "none", family: str = "ternary"):
    cls = type(f"Cfg_{name.replace('-', '_')}", (DummyConfig,), {})
    cls = dataclass(cls)
    register_method(MethodSpec(name=name, config_cls=cls, quantize_weight=_broken if broken else _quantize,
                               needs_calibration=False, family=family, bits=(2, 3), formats=("compressed-tensors",),
                               activations=activations, description="a test method"))
    try:
        yield name
    finally:
        unregister_method(name)


class RaisingKernel(Kernel):
    name = "test-raising-kernel"
    devices = ("cpu",)
    priority = 99
    layouts = "raises in supports()"

    def supports(self, qw, device):
        raise RuntimeError("supports blew up")


@contextlib.contextmanager
def raising_kernel():
    register_kernel(RaisingKernel)
    try:
        yield RaisingKernel.name
    finally:
        KERNELS.pop(RaisingKernel.name, None)
