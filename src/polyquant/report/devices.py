"""The device classes of the compatibility matrix and the advisor (CPU, CUDA, ROCm, Apple MPS,
Intel XPU): what each needs, the storage dtypes PyTorch has no support for there, and whether this
machine has one."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DeviceClass", "DEVICE_CLASSES", "device_class"]

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))


@dataclass(frozen=True)
class DeviceClass:
    """One column group of the matrix.

    Attributes:
        key: ``cpu``, ``cuda``, ``rocm``, ``mps``, ``xpu`` (JSON keys, ``--device`` values).
        label: column title.
        torch_type: the device type kernels are asked about (``Kernel.devices`` entries; ROCm
            kernels declare ``hip``).
        needs: what the machine and PyTorch build need.
        unsupported_dtypes: storage dtypes PyTorch cannot hold on this device class.
        dtype_note: why (shown as the reason).
    """

    key: str
    label: str
    torch_type: str
    needs: str
    unsupported_dtypes: tuple[torch.dtype, ...] = ()
    dtype_note: str = ""


DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("cpu", "CPU", "cpu", "any PyTorch build (x86-64 or arm64)"),
    DeviceClass("cuda", "CUDA", "cuda", "an NVIDIA GPU, its driver, and a CUDA build of PyTorch; the Triton "
                "kernels also need the triton package"),
    DeviceClass("rocm", "ROCm", "hip", "an AMD GPU with a ROCm build of PyTorch (it names the device 'cuda'; "
                "kernels declared for 'hip' only)"),
    DeviceClass("mps", "Apple MPS", "mps", "Apple silicon, macOS 13+, a PyTorch build with MPS",
                _FLOAT8 + (torch.float64,), "MPS has no float8 (or float64) tensors"),
    DeviceClass("xpu", "Intel XPU", "xpu", "an Intel GPU with PyTorch's XPU build and Intel's GPU driver"),
)

_BY_KEY = {d.key: d for d in DEVICE_CLASSES}
_ALIASES = {"gpu": "cuda", "hip": "rocm", "apple": "mps", "metal": "mps", "intel": "xpu"}


def device_class(name: str) -> DeviceClass:
    """The device class of ``name`` (``cpu``, ``cuda``, ``cuda:0``, ``rocm``, ``hip``, ``mps``, ``xpu``)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"device must be one of {sorted(_BY_KEY)}, got {name!r}")
    key = name.strip().lower().split(":", 1)[0]
    key = _ALIASES.get(key, key)
    if key not in _BY_KEY:
        raise ValueError(f"device must be one of {sorted(_BY_KEY)}, got {name!r}")
    return _BY_KEY[key]


def _present(dc: DeviceClass) -> bool:
    """Whether this machine has such a device (then ``supports`` checks the real one)."""
    if dc.key == "cpu":
        return True
    if dc.key == "cuda":
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is None
    if dc.key == "rocm":
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is not None
    if dc.key == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if dc.key == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False
