"""The ``polyquant`` argument parser, built from the registered commands."""
from __future__ import annotations

import argparse

from polyquant.cli.base import COMMANDS, Parser

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    import polyquant.cli.commands  # noqa: F401  (registers every command)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="info logs")
    p = Parser(prog="polyquant", parents=[common],
               description="Quantize Hugging Face models with many methods, save them in the ecosystem's formats, "
                           "and measure accuracy, size and speed. polyquant never downloads: MODEL is 'default' "
                           "(SmolLM2-135M-Instruct), a local HF folder or a .gguf file.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for cmd in sorted(COMMANDS.values(), key=lambda c: (c.order, c.name)):
        cmd.add_to(sub, common)
    return p
