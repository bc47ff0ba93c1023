"""Kernels: matmul over quantized layouts. ``reference`` (everywhere), ``cpu-*`` (PyTorch packed
ops), ``triton-*`` (GPU). Dispatch is the table in :mod:`polyquant.kernels.base`."""
from polyquant.kernels.base import KERNELS, Kernel, get_kernel, list_kernels, register_kernel, select_kernel
from polyquant.kernels import reference, cpu  # noqa: F401  (registers)

__all__ = ["KERNELS", "Kernel", "get_kernel", "list_kernels", "register_kernel", "select_kernel"]
