"""What every command module uses: ``UsageError``, the command registry, argparse types.

A command is one function in one module of :mod:`polyquant.cli.commands`::

    @command("export", help="...", description="...", args=[arg("checkpoint"), arg("--to", default="x")])
    def cmd_export(args) -> int:
        ...

``args`` are ``add_argument`` calls (``arg(...)``, or ``group(arg(...), ...)`` for a mutually
exclusive set); ``order`` places it in ``polyquant --help``. The parser is built from ``COMMANDS``,
so nothing else changes when a command is added.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["UsageError", "Parser", "command", "arg", "group", "COMMANDS", "Command", "positive", "csv"]


class UsageError(Exception):
    """Bad usage or input: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we report one line
        cmd = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{cmd + ': ' if cmd else ''}{message} (see {self.prog} --help)")


@dataclass(frozen=True)
class _Arg:
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class _Group:
    members: tuple[_Arg, ...]


def arg(*args: Any, **kwargs: Any) -> _Arg:
    """One ``parser.add_argument(*args, **kwargs)``."""
    return _Arg(args, kwargs)


def group(*members: _Arg) -> _Group:
    """A mutually exclusive group of arguments."""
    return _Group(members)


@dataclass
class Command:
    name: str
    func: Callable[[argparse.Namespace], int]
    help: str
    description: str | Callable[[], str]
    args: list = field(default_factory=list)
    order: int = 100
    formatter: type = argparse.HelpFormatter

    def add_to(self, sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
        desc = self.description() if callable(self.description) else self.description
        p = sub.add_parser(self.name, parents=[common], help=self.help, description=desc,
                           formatter_class=self.formatter)
        for a in self.args() if callable(self.args) else self.args:
            if isinstance(a, _Group):
                g = p.add_mutually_exclusive_group()
                for m in a.members:
                    g.add_argument(*m.args, **m.kwargs)
            else:
                p.add_argument(*a.args, **a.kwargs)
        p.set_defaults(func=self.func)
        return p


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, description: str | Callable[[], str] | None = None,
            args: list | Callable[[], list] = (), order: int = 100, formatter: type = argparse.HelpFormatter):
    """Register the decorated ``func(args) -> exit code`` as ``polyquant NAME``. ``description``
    and ``args`` may be callables (evaluated when the parser is built: registries filled)."""
    def deco(func):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        COMMANDS[name] = Command(name, func, help, description if description is not None else help + ".",
                                 args if callable(args) else list(args), order, formatter)
        return func
    return deco


def positive(v: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return n


def csv(kind: str):
    """argparse type: a comma-separated list of names (``kind='str'``) or integers."""
    def parse(v: str) -> list:
        items = [x.strip() for x in v.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {v!r}")
        if kind == "str":
            return items
        try:
            return [int(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {v!r}") from None
    return parse
