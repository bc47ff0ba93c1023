"""Small compiled CPU kernels: build a C file from ``kernels/csrc`` with the system C compiler once,
cache the shared library, load it with ctypes. The C files share ``csrc/*.h`` headers
(``pq_common.h``: includes, the x86 switch, the CPU feature probe), copied beside the file built;
:class:`CLibrary` types a library's functions once.

No Python headers, no ninja, no torch C++ API: the C functions take raw pointers and sizes, so any C
compiler (``$CC``, ``cc``, ``gcc``, ``clang``) builds them in about a second. The library is cached
under ``$POLYQUANT_CACHE_DIR`` (default ``~/.cache/polyquant``)/``cext``, keyed by a hash of the
source, the compiler and its flags; it is written to a temporary file and renamed (atomic, safe for
parallel processes; a read-only cache folder falls back to the temporary folder). A kernel that needs a library reports why it cannot run - no compiler, a build
error, or ``POLYQUANT_NO_CEXT=1`` - through its ``supports`` reason; nothing falls back silently.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["load_library", "library_error", "cache_dir", "runnable_levels", "CLibrary", "I64", "PTR"]

I64, PTR = ctypes.c_int64, ctypes.c_void_p  # the C functions take sizes as int64 and raw pointers

_LIBS: dict[str, ctypes.CDLL | str] = {}
_LOCK = threading.Lock()
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared"]


def cache_dir() -> Path:
    from polyquant.cache import cache_root  # $POLYQUANT_CACHE_DIR (see polyquant.cache)
    return cache_root() / "cext"


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _load_cached(path: Path) -> ctypes.CDLL | None:
    """The cached library, or None when there is none or it does not load (a truncated or foreign
    file: removed, so that it is built again)."""
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return None


def _build(name: str) -> ctypes.CDLL:
    if os.environ.get("POLYQUANT_NO_CEXT", "") not in ("", "0"):
        raise RuntimeError("compiled CPU kernels are disabled (POLYQUANT_NO_CEXT is set)")
    csrc = resources.files("polyquant.kernels").joinpath("csrc")
    src = csrc.joinpath(f"{name}.c").read_bytes()
    # the shared headers (``#include "pq_common.h"``): copied next to the C file, hashed into the key
    headers = {h.name: h.read_bytes() for h in sorted(csrc.iterdir(), key=lambda h: h.name) if h.name.endswith(".h")}
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang) to build the compiled CPU kernel")
    suffix = ".dll" if os.name == "nt" else ".so"
    for omp in (["-fopenmp"], []):  # OpenMP when the compiler has it (threads > 1), else serial
        flags = _FLAGS + omp
        key = hashlib.sha256(src + b"".join(b"\0" + h.encode() + b"\0" + t for h, t in headers.items())
                             + "\0".join([cc, *flags, platform.machine(), platform.system()]).encode()).hexdigest()[:16]
        out = cache_dir() / f"{name}-{key}{suffix}"
        if (lib := _load_cached(out)) is not None:
            return lib
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK):
                raise PermissionError(str(out.parent))
        except OSError:  # a read-only home: build in the temporary folder instead
            out = Path(tempfile.gettempdir()) / f"polyquant-cext-{os.getuid() if hasattr(os, 'getuid') else 0}" / out.name
            if (lib := _load_cached(out)) is not None:
                return lib
            out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            c_file = Path(tmp) / f"{name}.c"
            c_file.write_bytes(src)
            for h, text in headers.items():
                (Path(tmp) / h).write_bytes(text)
            lib = Path(tmp) / f"{name}{suffix}"
            r = subprocess.run([cc, *flags, str(c_file), "-o", str(lib)], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(lib, out)
                return ctypes.CDLL(str(out))
            err = (r.stderr or r.stdout).strip().splitlines()
    raise RuntimeError(f"building kernels/csrc/{name}.c with {cc} failed: {' | '.join(err[-3:])}")


def load_library(name: str) -> ctypes.CDLL:
    """The compiled ``kernels/csrc/<name>.c`` (built on first use); RuntimeError saying why not."""
    with _LOCK:
        lib = _LIBS.get(name)
        if lib is None:
            try:
                lib = _build(name)
            except (RuntimeError, OSError) as e:
                lib = str(e)
            _LIBS[name] = lib
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


def library_error(name: str) -> str | None:
    """None when the library loads, else the reason (for a kernel's ``supports``)."""
    try:
        load_library(name)
        return None
    except RuntimeError as e:
        return str(e)


def runnable_levels(level: int) -> list[int]:
    """Every code path a CPU whose best is ``level`` can run (tests cover each), in the C files'
    shared numbering: 0 portable C, 2 AVX2 + FMA, 1 AVX-512F, 3 AVX-512 VNNI (a superset of 1)."""
    return [0] + ([2] if level in (1, 2, 3) else []) + ([1] if level in (1, 3) else []) + ([3] if level == 3 else [])


class CLibrary:
    """One compiled ``kernels/csrc/<name>.c`` with its functions typed once.

    ``signatures`` maps a C function to ``(argtypes, restype)``; ``pq_<name>_simd_level`` (the
    best code path this CPU runs, in :func:`runnable_levels`' numbering) is declared for every
    library. ``lib()`` builds, loads and types it (RuntimeError saying why not), ``error()`` is
    that reason for a kernel's ``supports`` (None when it loads)."""

    def __init__(self, name: str, signatures: dict[str, tuple[list[Any], Any]]) -> None:
        self.name = name
        self.signatures = {**signatures, f"pq_{name}_simd_level": ([], ctypes.c_int)}
        self._lib: ctypes.CDLL | None = None
        self._level: int | None = None

    def lib(self) -> ctypes.CDLL:
        if self._lib is None:
            lib = load_library(self.name)
            for fn, (argtypes, restype) in self.signatures.items():
                f = getattr(lib, fn)
                f.argtypes, f.restype = argtypes, restype
            self._lib = lib
        return self._lib

    def error(self) -> str | None:
        return library_error(self.name)

    def simd_level(self) -> int:
        if self._level is None:
            self._level = int(getattr(self.lib(), f"pq_{self.name}_simd_level")())
        return self._level

    def simd_levels(self) -> list[int]:
        """Every code path this CPU can run (tests cover each)."""
        return runnable_levels(self.simd_level())

    def level(self, simd: int | None) -> int:
        """The code path a call runs: ``simd`` when given, else this CPU's best."""
        return self.simd_level() if simd is None else int(simd)
