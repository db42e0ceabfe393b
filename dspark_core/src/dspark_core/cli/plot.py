"""``dspark plot RUN_DIR``: draw a training run's loss, tau and per-position acceptance as PNG."""

from __future__ import annotations

import argparse

HELP = "draw a training run's loss, tau and per-position acceptance as PNG (needs matplotlib)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a training output directory (or its metrics.jsonl)"
    )
    parser.add_argument(
        "--output", "-o", default=None, metavar="DIR", help="where to write (default RUN_DIR/plots)"
    )


def run(args: argparse.Namespace) -> int:
    from dspark_core.training.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
