"""``dspark doctor``: import every plugin's draft class and report each problem."""

from __future__ import annotations

import argparse

from dspark_core.cli.plugins_list import discovery_report
from dspark_core.registry import _conflict_message

HELP = "import every registered draft class and check it; exits 1 on any problem (for plugin CI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    report = discovery_report()
    problems = [str(failure) for failure in report.failures]
    checked = 0
    for entry in report.entries.values():
        if entry.status == "conflict":
            problems.append(_conflict_message(entry))
            continue
        try:
            cls = entry.spec.draft_cls
            from transformers import PreTrainedModel

            if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
                problems.append(
                    f"{entry.architecture}: draft class {cls!r} from {entry.plugin.label} is not a "
                    "transformers.PreTrainedModel subclass"
                )
                continue
        except Exception as exc:
            problems.append(f"{entry.architecture}: {type(exc).__name__}: {' '.join(str(exc).split())}")
            continue
        checked += 1
        print(f"ok       {entry.architecture} -> {cls.__module__}.{cls.__qualname__} ({entry.plugin.label})")
    for problem in problems:
        print(f"PROBLEM  {problem}")
    print(f"{checked} draft class(es) ok, {len(problems)} problem(s)")
    return 1 if problems else 0
