"""Method configs from generic options: what the command line (or any front end) hands over.

The generic options ``bits``, ``group_size``, ``sym``, ``act_order``, ``clip_search``, layer
selection and ``key=value`` strings set fields of the chosen method's config dataclass; each string
is converted from the field's type (:func:`convert_value`), so a newly registered method needs no
change in any front end. A field the config does not have is refused with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Sequence

from polyquant.methods.base import MethodConfig
from polyquant.methods.registry import get_method

__all__ = ["build_config", "convert_value", "config_options", "option_defaults", "GENERIC_FLAGS"]

#: generic option -> the flag that sets it on the command line (for messages)
GENERIC_FLAGS = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym", "act_order": "--act-order",
                 "clip_search": "--clip-search"}


def config_options(cls: type[MethodConfig]) -> dict[str, dataclasses.Field]:
    """The settable fields of a config class."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def option_defaults(cls: type[MethodConfig]) -> dict[str, Any]:
    """Each settable field's default (None where it has none)."""
    out = {}
    for f in config_options(cls).values():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert_value(raw: str, tp: Any, name: str) -> Any:
    """Convert a string to a config field's type (``int``, ``float``, ``bool``, ``str``,
    ``X | None``, ``Literal``, ``list[X]`` / ``tuple[X, ...]`` as comma-separated or JSON,
    ``dict`` as JSON). Raises ValueError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(raw, a, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{name}: cannot read {raw!r} as {_type_name(tp)}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(f"{name} must be one of {list(args)}, got {raw!r}")
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on", "y"):
            return True
        if low in ("0", "false", "no", "off", "n"):
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if tp is str:
        return raw
    if origin in (list, tuple, set, frozenset):
        if raw.strip().startswith("["):
            try:
                items = json.loads(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a JSON list") from None
            items = [json.dumps(x) if not isinstance(x, str) else x for x in items]
        else:
            items = [x.strip() for x in raw.split(",")] if raw.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{name} needs {len(args)} comma-separated values, got {raw!r}")
            return tuple(convert_value(x, a, name) for x, a in zip(items, args))
        elem = args[0] if args else str
        vals = [convert_value(x, elem, name) for x in items]
        return origin(vals) if origin is not list else vals
    if origin is dict or tp is dict:
        try:
            val = json.loads(raw)
        except ValueError:
            raise ValueError(f"{name} must be a JSON object, got {raw!r}") from None
        if not isinstance(val, dict):
            raise ValueError(f"{name} must be a JSON object, got {raw!r}")
        return val
    try:  # anything else: JSON, else the string
        return json.loads(raw)
    except ValueError:
        return raw


def _group_field(method: str, cls: type[MethodConfig], fields, value: int, listing: str) -> tuple[str, Any]:
    """``--group-size`` on a method whose group size has its home library's name (bitsandbytes'
    ``blocksize``, fine-grained FP8's ``weight_block_size`` block, set to N x N)."""
    gf = cls.group_field
    if gf is None or gf not in fields:
        raise ValueError(f"method {method!r} has no group size (--group-size); its options: {listing}")
    default = fields[gf].default_factory() if fields[gf].default_factory is not dataclasses.MISSING \
        else fields[gf].default
    return gf, [value] * len(default) if isinstance(default, (list, tuple)) else value


def config_values(method: str, bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
                  act_order: bool | None = None, clip_search: bool | None = None,
                  include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                  lm_head: bool = False, opts: Sequence[str] = ()) -> dict[str, Any]:
    """The field values the options set (only those given), converted and checked by name; the
    config is not built yet (see :func:`build_config`). Raises ValueError naming the problem."""
    spec = get_method(method)
    cls = spec.config_cls
    fields = config_options(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable annotation: fall back to JSON/str
        hints = {}
    listing = ", ".join(sorted(fields))
    values: dict[str, Any] = {}
    for name, value in (("bits", bits), ("group_size", group_size), ("sym", sym), ("act_order", act_order),
                        ("clip_search", clip_search)):
        if value is None:
            continue
        if name == "group_size" and name not in fields:
            name, value = _group_field(method, cls, fields, value, listing)
        if name not in fields:
            if name == "bits" and tuple(spec.bits) == (value,):
                continue  # a fixed-width method asked for its own width
            raise ValueError(f"method {method!r} has no option {GENERIC_FLAGS[name]} ({name}); its options: {listing}")
        values[name] = value
    if include:
        values["include"] = list(include)
    if exclude:
        values["exclude"] = list(exclude)
    if lm_head:
        values["quantize_lm_head"] = True
    for item in opts:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--opt needs key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"method {method!r} has no option {key!r}; its options: {listing}")
        try:
            values[key] = convert_value(raw, hints.get(key, Any), key)
        except ValueError as e:
            raise ValueError(f"--opt {item}: {e}") from None
    return values


def build_config(method: str, **options: Any) -> MethodConfig:
    """A validated config of ``method`` from generic options (see :func:`config_values`).
    Raises ValueError naming the problem."""
    values = config_values(method, **options)
    try:
        return get_method(method).config_cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid {method} config: {e}") from None
