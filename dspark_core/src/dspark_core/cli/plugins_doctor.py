"""``dspark doctor``: check every registered family as its plugin's CI would, and report each problem."""

from __future__ import annotations

import argparse

from dspark_core.cli.plugins_list import discovery_report

HELP = (
    "check every registered family: its draft class and config_class, and a tiny draft's forward and "
    "propose; exits 1 on any problem, or when no family is registered (for plugin CI)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    from dspark_core.doctor import check_report

    result = check_report(discovery_report())
    for line in result.ok:
        print(f"ok       {line}")
    for problem in result.problems:
        print(f"PROBLEM  {problem}")
    print(f"{len(result.ok)} draft class(es) ok, {len(result.problems)} problem(s)")
    return 1 if result.problems else 0
