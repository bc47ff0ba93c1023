"""``main``: parse, run the command, turn every outcome into one line and an exit code.

Errors print one line to stderr (``polyquant: error: ...``); bad usage or input exits with 2, an
unexpected failure with 1 (``--debug`` shows the traceback), Ctrl-C with 130 and what to do next.
A closed stdout (``polyquant info DIR | head -1``) is a normal end: exit 0, nothing printed.
Results go to stdout, logs and progress bars to stderr.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Sequence

from polyquant.cli.base import UsageError
from polyquant.cli.render import err

__all__ = ["main"]


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up per record, so captured streams work)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("polyquant")
    logger.setLevel(level)
    if not any(getattr(h, "_polyquant", False) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("polyquant: %(levelname)s: %(message)s"))
        h._polyquant = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.propagate = False


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg += f": {e.filename}"
    return msg


def _closed_stdout() -> int:
    """stdout's reader went away: silence the interpreter's flush at exit, end normally."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a captured / replaced stdout
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad usage or input, 130 interrupted)."""
    from polyquant.cli.commands.quantize import Interrupted
    from polyquant.cli.parser import build_parser
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _setup_logging("-v" in argv or "--verbose" in argv, debug)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:
        return _closed_stdout()
    except Interrupted as e:
        err(f"polyquant: {e}")
        return 130
    except KeyboardInterrupt:
        err("polyquant: interrupted; nothing was written")
        return 130
    except UsageError as e:
        if debug:
            traceback.print_exc()
        err(f"polyquant: error: {_one_line(e)}")
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        # bad input: a config the method refuses, a corrupt or foreign checkpoint (CheckpointError)
        if debug:
            traceback.print_exc()
        err(f"polyquant: error: {_one_line(e)}")
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        err(f"polyquant: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)")
        return 1
