"""What the Triton kernels (``triton-w4a16``, ``triton-fp8-block``) share: whether triton is
installed, its lazy import into a kernel module's globals (a ``@triton.jit`` function reads ``tl``
from its own module), and the compiled-or-interpreted wrapper of a kernel function, made once."""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

__all__ = ["triton_available", "triton_reason", "import_triton", "jit_kernel"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_reason() -> str | None:
    """Why a Triton kernel cannot run here (None when triton is installed)."""
    return None if triton_available() else "triton is not installed (pip install triton)"


def import_triton(namespace: dict[str, Any]) -> None:
    """Set ``triton`` and ``tl`` (``triton.language``) in ``namespace`` (a module's globals), once."""
    if namespace.get("tl") is None:
        import triton
        import triton.language as tl
        namespace["triton"], namespace["tl"] = triton, tl


def jit_kernel(fn: Callable[..., Any], interpret: bool, cache: dict[Any, Any]) -> Any:
    """``fn`` JIT-compiled (GPU) or interpreted (CPU tensors / ``TRITON_INTERPRET=1``), kept in
    ``cache`` under ``(interpret, fn.__name__)``."""
    key = (interpret, fn.__name__)
    if key not in cache:
        import_triton(fn.__globals__)
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            cache[key] = InterpretedFunction(fn)
        else:
            cache[key] = fn.__globals__["triton"].jit(fn)
    return cache[key]
