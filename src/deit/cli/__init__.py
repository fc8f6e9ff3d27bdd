"""The ``deit`` command: one small module per subcommand over one library call.

Each subcommand module has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
:data:`COMMANDS` lists them in the order ``deit --help`` shows. Every failure the library
raises on purpose (a :class:`~deit.errors.DeiTError`, or a built-in error of the kinds a
user can cause: a missing file, a missing package) is printed here, as one line on stderr,
with the exit code its class declares; ``DEIT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deit.cli import (
    bench,
    calibrate,
    convert,
    data,
    evaluate,
    explain,
    export,
    info,
    plot,
    predict,
    quantize,
    serve,
    train,
)
from deit.errors import EXIT_USAGE, DeiTError

COMMANDS = (
    predict,
    convert,
    info,
    train,
    evaluate,
    calibrate,
    plot,
    bench,
    export,
    quantize,
    serve,
    explain,
    data,
)

# Built-in errors that mean "fix your input or environment", not "bug": one line, exit 2.
_USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError, ArithmeticError)


def build_parser() -> argparse.ArgumentParser:
    """The ``deit`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="deit",
        description="DeiT image classification: predict, train and distill, evaluate, export, "
        "quantize, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def error_message(e: BaseException) -> str:
    """The one line shown for ``e``."""
    if isinstance(e, KeyError) and not isinstance(e, DeiTError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deit`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `deit ... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
    except (DeiTError, *_USER_ERRORS) as e:
        if os.environ.get("DEIT_DEBUG"):
            raise
        print(f"deit {args.command}: error: {error_message(e)}", file=sys.stderr)
        return e.exit_code if isinstance(e, DeiTError) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"deit {args.command}: interrupted", file=sys.stderr)
        return 130
