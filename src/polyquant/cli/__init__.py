"""The ``polyquant`` command line: thin wrappers over the public API.

``app.main`` runs a command; ``parser.build_parser`` builds the parser from the commands that the
modules of :mod:`polyquant.cli.commands` register (``@command``, see :mod:`polyquant.cli.base`);
``paths`` checks inputs and outputs before any work; ``render`` prints tables and mappings.
Method options are generic (``--bits``, ``--group-size``, ``--sym/--asym``, ``--act-order``,
``--clip-search``, ``--opt key=value`` set fields of the method's config; built by
:mod:`polyquant.methods.options`), so a newly registered method needs no change here.
"""
from __future__ import annotations

from typing import Any

from polyquant.cli.app import main
from polyquant.cli.base import UsageError, command
from polyquant.cli.parser import build_parser
from polyquant.cli.render import markdown_table, text_table
from polyquant.methods.options import convert_value

__all__ = ["main", "build_parser", "build_config", "convert_value", "UsageError", "command", "text_table",
           "markdown_table"]


def build_config(method: str, **options: Any):
    """A validated config of ``method`` from generic options (:func:`polyquant.methods.options.build_config`);
    raises ``UsageError`` naming the problem."""
    from polyquant.methods.options import build_config as _build
    try:
        return _build(method, **options)
    except ValueError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
