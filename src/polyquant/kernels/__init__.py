"""Kernels: matmul over quantized layouts. ``reference`` (everywhere), ``cpu-*`` (PyTorch packed
ops), ``triton-*`` (GPU). Dispatch is the table in :mod:`polyquant.kernels.base`."""
from polyquant.kernels.base import KERNELS, Kernel, get_kernel, list_kernels, register_kernel, select_kernel
from polyquant.kernels import reference, cpu  # noqa: F401  (registers)
from polyquant.kernels import cpu_actorder, triton_w4a16  # noqa: F401,E402  (registers; triton imported lazily)
from polyquant.kernels import bnb_int8  # noqa: F401,E402  (registers llm-int8)
from polyquant.kernels import fp8, triton_fp8_block  # noqa: F401,E402  (registers fp8-emulated, fp8-scaled-mm, triton-fp8-block)
from polyquant.kernels import int8_dynamic  # noqa: F401,E402  (registers int8-dynamic)
from polyquant.kernels import quanto_act  # noqa: F401,E402  (registers quanto-int8)
from polyquant.kernels import cpu_lut4  # noqa: F401,E402  (registers cpu-lut4)
from polyquant.kernels import cpu_ternary  # noqa: F401,E402  (registers cpu-ternary)
from polyquant.kernels import cpu_aqlm  # noqa: F401,E402  (registers cpu-aqlm)
from polyquant.kernels import cpu_spqr  # noqa: F401,E402  (registers cpu-spqr)
from polyquant.kernels import cpu_gemv  # noqa: F401,E402  (registers cpu-gemv)

__all__ = ["KERNELS", "Kernel", "get_kernel", "list_kernels", "register_kernel", "select_kernel"]

from polyquant.plugins import load_plugins as _load_plugins  # noqa: E402

# third-party kernels (entry points ``polyquant.kernels``), after the built-ins
_load_plugins("polyquant.kernels", register_kernel, lambda obj: isinstance(obj, type) and issubclass(obj, Kernel))
