"""Third-party plug-ins through entry points (``importlib.metadata``), as pytest and many libraries
load theirs.

A package adds a method, a format or a kernel by declaring an entry point in one of the groups
``polyquant.methods``, ``polyquant.formats``, ``polyquant.kernels``; for example in its
``pyproject.toml``::

    [project.entry-points."polyquant.methods"]
    toy = "toyquant"            # a module whose import registers (register_method(...))

The value may name a module (importing it registers, as the built-in modules do), a registry
object (a ``MethodSpec``, a ``Format`` or ``Kernel`` subclass: it is registered), or a callable
taking no argument (it is called). Each registry's package loads its group at the end of its own
import, after the built-ins, so a plug-in can import the package it extends. A plug-in that fails
(raises, or names a taken name) is reported by name - a warning and :data:`PLUGIN_ERRORS` - and
the built-ins are left as they were. ``POLYQUANT_NO_PLUGINS=1`` loads none.
"""
from __future__ import annotations

import importlib.metadata
import os
import warnings
from typing import Any, Callable

__all__ = ["GROUPS", "PLUGIN_ERRORS", "LOADED", "load_plugins", "plugin_errors"]

GROUPS = ("polyquant.methods", "polyquant.formats", "polyquant.kernels")

#: group -> {entry point name: "ExceptionType: message"} of the plug-ins that failed to load
PLUGIN_ERRORS: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
#: group -> {entry point name: its value} of the plug-ins loaded
LOADED: dict[str, dict[str, str]] = {g: {} for g in GROUPS}


def _entry_points(group: str) -> list[Any]:
    eps = importlib.metadata.entry_points()
    found = eps.select(group=group) if hasattr(eps, "select") else eps.get(group, [])
    seen, out = set(), []
    for ep in found:  # the same distribution on sys.path twice lists its entry points twice
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return sorted(out, key=lambda e: e.name)


def load_plugins(group: str, register: Callable[[Any], Any] | None = None,
                 accepts: Callable[[Any], bool] | None = None) -> dict[str, str]:
    """Load the entry points of ``group`` not loaded yet. ``accepts(obj)`` says whether a loaded
    object is a registry object, which ``register(obj)`` then registers. Returns the errors of this
    call (entry point name -> message); each is also warned about and kept in ``PLUGIN_ERRORS``."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if os.environ.get("POLYQUANT_NO_PLUGINS", "") not in ("", "0"):
        return {}
    errors: dict[str, str] = {}
    try:
        eps = _entry_points(group)
    except Exception as e:  # broken metadata on sys.path must not break polyquant
        eps = []
        errors["<entry points>"] = f"{type(e).__name__}: {e}"
    for ep in eps:
        if LOADED[group].get(ep.name) == ep.value:
            continue
        try:
            obj = ep.load()
            if accepts is not None and register is not None and accepts(obj):
                register(obj)
            elif callable(obj) and not isinstance(obj, type):
                obj()
            LOADED[group][ep.name] = ep.value
            PLUGIN_ERRORS[group].pop(ep.name, None)
        except Exception as e:  # a plug-in's own bug: reported, never fatal
            errors[ep.name] = f"{type(e).__name__}: {e}"
    for name, msg in errors.items():
        PLUGIN_ERRORS[group][name] = msg
        warnings.warn(f"polyquant plug-in {name!r} ({group}) failed to load and is skipped: {msg}", stacklevel=2)
    return errors


def plugin_errors() -> dict[str, dict[str, str]]:
    """The plug-ins that failed to load, by group (empty groups left out)."""
    return {g: dict(e) for g, e in PLUGIN_ERRORS.items() if e}
