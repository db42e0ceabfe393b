"""The ``dspark`` console script.

Each subcommand lives in its own module of this package, which must import without torch: the
heavy code is imported inside its ``run`` function, so ``dspark list`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from dspark_core.errors import DSparkError

# (command, aliases, module). Each module defines HELP, add_arguments(parser) and run(args) -> int.
COMMANDS: list[tuple[str, tuple[str, ...], str]] = [
    ("list", ("plugins",), "dspark_core.cli.plugins_list"),
    ("resolve", (), "dspark_core.cli.plugins_resolve"),
    ("doctor", (), "dspark_core.cli.plugins_doctor"),
    ("generate", (), "dspark_core.cli.generate"),
    ("train", (), "dspark_core.cli.train"),
    ("regenerate", (), "dspark_core.cli.regenerate"),
    ("plot", (), "dspark_core.cli.plot"),
    ("make-tiny-target", (), "dspark_core.cli.make_tiny_target"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark", description="DSpark draft models: plugins, decoding, training."
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, aliases, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, aliases=list(aliases), help=module.HELP, description=module.HELP)
        command.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a reported problem, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except KeyboardInterrupt:
        print("dspark: interrupted", file=sys.stderr)
        return 130
    except (DSparkError, ValueError, TypeError, OSError, ImportError) as exc:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"dspark {args.command}: error: {message}", file=sys.stderr)
        return 1
