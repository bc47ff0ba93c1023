"""The name -> object tables (methods, formats, kernels, exporters, activation rules): one way
to add an entry and one way to look one up, with the same messages everywhere.

A table is a plain ``dict``; these functions are what every ``register_*`` / ``get_*`` of the
registries calls (the lowest layer: it imports nothing of polyquant).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["instance", "add_entry", "lookup"]

T = TypeVar("T")


def instance(obj: Any) -> Any:
    """A registered object given as its class is instantiated (``register_format(GPTQFormat)``)."""
    return obj() if isinstance(obj, type) else obj


def add_entry(table: dict[str, T], name: str, obj: T, kind: str) -> T:
    """``table[name] = obj``; ValueError when the name is empty or taken (names are never reused)."""
    if not name or name in table:
        raise ValueError(f"{kind} name {name!r} is empty or already registered")
    table[name] = obj
    return obj


def lookup(table: dict[str, T], name: str, kind: str,
           hint: Callable[[dict[str, T]], str] | None = None) -> T:
    """``table[name]``; otherwise ValueError ``unknown <kind> 'x'; known <kind>s: a, b`` (or
    ``hint(table)`` after the semicolon)."""
    try:
        return table[name]
    except KeyError:
        tail = hint(table) if hint is not None else f"known {kind}s: {', '.join(sorted(table))}"
        raise ValueError(f"unknown {kind} {name!r}; {tail}") from None
