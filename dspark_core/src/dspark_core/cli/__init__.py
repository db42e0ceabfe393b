"""The ``dspark`` console script.

Each subcommand lives in its own module of this package, which must import without torch: the
heavy code is imported inside its ``run`` function, so ``dspark list`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from dspark_core.errors import DSparkError

# (command, aliases, module). Each module defines HELP, add_arguments(parser) and run(args) -> int.
COMMANDS: list[tuple[str, tuple[str, ...], str]] = [
    ("quickstart", (), "dspark_core.cli.quickstart"),
    ("list", ("plugins",), "dspark_core.cli.plugins_list"),
    ("resolve", (), "dspark_core.cli.plugins_resolve"),
    ("doctor", (), "dspark_core.cli.plugins_doctor"),
    ("generate", (), "dspark_core.cli.generate"),
    ("eval", (), "dspark_core.cli.eval"),
    ("train", (), "dspark_core.cli.train"),
    ("regenerate", (), "dspark_core.cli.regenerate"),
    ("verify", (), "dspark_core.cli.verify"),
    ("check-draft", (), "dspark_core.cli.check_draft"),
    ("calibrate", (), "dspark_core.cli.calibrate"),
    ("plot", (), "dspark_core.cli.plot"),
    ("make-tiny-target", (), "dspark_core.cli.make_tiny_target"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's (the others are not imported)."""
    parser = argparse.ArgumentParser(
        prog="dspark", description="DSpark draft models: plugins, decoding, training."
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show tracebacks and third-party libraries' full output"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, aliases, module_name in COMMANDS:
        if only is not None and only != name and only not in aliases:
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, aliases=list(aliases), help=module.HELP, description=module.HELP)
        # SUPPRESS: `dspark --verbose CMD` must not be reset by the subcommand's own default.
        command.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and third-party libraries' full output",
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _requested_command(argv: Sequence[str]) -> str | None:
    # Building every subcommand's parser imports every CLI module; `dspark list` must stay fast.
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    known = {name for name, _, _ in COMMANDS} | {alias for _, aliases, _ in COMMANDS for alias in aliases}
    return first if first in known else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a reported problem, 2 bad usage)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_requested_command(arguments))
    args = parser.parse_args(arguments)
    from dspark_core.cli.library_output import routed_library_output

    # Commands that never load a model skip transformers' import (`dspark list` stays fast).
    library_output = (
        contextlib.nullcontext()
        if args.command in _NO_MODEL_COMMANDS
        else routed_library_output(verbose=args.verbose)
    )
    with warnings.catch_warnings(), library_output:
        # Plugins' and libraries' warnings and log records reach the user as one line each.
        warnings.showwarning = one_line_showwarning(verbose=args.verbose)
        return _run(args)


#: Commands (and aliases) that load no model and must not import transformers (each has a test
#: saying so), so its output needs no routing. A command missing here is routed: always safe.
_NO_MODEL_COMMANDS = frozenset({"list", "plugins", "resolve", "verify", "plot", "check-draft"})


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.run(args)
        return code
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("dspark: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"dspark {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 1


#: Errors whose message names what is wrong: dspark's own, and the ones Python and the libraries
#: raise for bad input (a missing file, a bad value). Anything else is a bug in dspark.
_USER_ERRORS = (DSparkError, ValueError, TypeError, OSError, ImportError, EOFError)


def describe_error(exc: BaseException) -> str:
    """One line for ``exc``: the message for a user error, or an invitation to report an internal one.

    A :class:`DSparkError` marked ``multiline`` (several failed plugins) keeps one item per line.
    """
    if isinstance(exc, DSparkError) and exc.multiline:
        lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
        return "error: " + "\n  ".join(lines)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, _USER_ERRORS):
        return f"error: {message}"
    return (
        f"internal error: {type(exc).__name__}: {message}. This is a bug in dspark: please report it with "
        "the output of the same command run with --verbose"
    )


def format_warning(category: type[Warning], message: object) -> str:
    """``warning: <Category>: <message>`` on one line."""
    return f"warning: {category.__name__}: {' '.join(str(message).split())}"


def print_warning(category: type[Warning], message: object) -> None:
    """Print a warning the CLI reports itself (e.g. from a discovery report) as :func:`format_warning`."""
    print(format_warning(category, message), file=sys.stderr)


def one_line_showwarning(*, verbose: bool = False) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing :func:`format_warning`; ``verbose`` adds where it came from."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        del line
        text = format_warning(category, message) + (f" ({filename}:{lineno})" if verbose else "")
        stream: Any = file if file is not None else sys.stderr
        print(text, file=stream)

    return show
