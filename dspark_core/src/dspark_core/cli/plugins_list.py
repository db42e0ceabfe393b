"""``dspark list``: what the installed plugins register, and what failed."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from dspark_core.cli import print_warning
from dspark_core.errors import DSparkPluginWarning
from dspark_core.registry import (
    DSPARK_DRAFT_REGISTRY,
    DiscoveryReport,
    PluginInfo,
    strict_failure_message,
    strict_mode,
)
from dspark_core.spec import spec_reference

HELP = "list registered architectures, their draft classes and plugin status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def discovery_report() -> DiscoveryReport:
    """The report, whatever ``DSPARK_STRICT_PLUGINS`` says, with each selection warning on stderr.

    The commands show the failures themselves, so the per-failure warnings would only repeat them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DSparkPluginWarning)
        report = DSPARK_DRAFT_REGISTRY.report(strict=False)
    for message in report.selection_warnings:
        print_warning(DSparkPluginWarning, message)
    return report


def strict_exit(report: DiscoveryReport, command: str) -> int:
    """1, with the strict-mode error, when ``DSPARK_STRICT_PLUGINS`` is set and a plugin failed."""
    if not (strict_mode() and report.failures):
        return 0
    lines = strict_failure_message(report.failures).splitlines()
    print(f"dspark {command}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line.strip()}", file=sys.stderr)
    return 1


def _plugin_json(info: PluginInfo) -> dict[str, Any]:
    return {
        "plugin": info.name,
        "distribution": info.distribution,
        "version": info.version,
        "entry_point": info.value,
        "status": info.status,
    }


def report_rows(report: DiscoveryReport) -> list[dict[str, Any]]:
    """One row per (architecture, provider), plus one per plugin that registered nothing usable."""
    rows: list[dict[str, Any]] = []
    for entry in report.entries.values():
        for info, spec in entry.providers:
            status = entry.status
            rows.append(
                {
                    "architecture": entry.architecture,
                    "draft_class": spec_reference(spec),
                    **_plugin_json(info),
                }
                | {"status": status}
            )
    for info in report.plugins:
        if info.status != "ok":
            rows.append({"architecture": None, "draft_class": None, **_plugin_json(info)})
    return rows


def run(args: argparse.Namespace) -> int:
    report = discovery_report()
    rows = report_rows(report)
    if args.json:
        payload = {
            "architectures": rows,
            "plugins": [_plugin_json(info) for info in report.plugins],
            "failures": [
                {**_plugin_json(f.plugin), "stage": f.stage, "error": f.error} for f in report.failures
            ],
            "duplicates": report.duplicates,
            "unknown_selection": report.unknown_selection,
            "ambiguous_selection": report.ambiguous_selection,
            "selection_warnings": report.selection_warnings,
        }
        print(json.dumps(payload, indent=2))
        return strict_exit(report, "list")
    header = ("ARCHITECTURE", "DRAFT CLASS", "DISTRIBUTION", "STATUS")
    table = [
        (
            row["architecture"] or "-",
            row["draft_class"] or "-",
            f"{row['distribution']} {row['version']}"
            if row["distribution"]
            else f"in-process {row['plugin']}",
            row["status"],
        )
        for row in rows
    ]
    if not table:
        print("No dspark plugins installed. Install a family, e.g. `pip install dspark-qwen3`.")
        return strict_exit(report, "list")
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    if report.failures:
        print("\nFailed plugins:")
        for failure in report.failures:
            print(f"  {failure}")
    blocked = [info for info in report.plugins if info.status == "blocked"]
    if blocked:
        print("\nBlocked by selection: " + ", ".join(f"{b.label} by {b.blocked_by}" for b in blocked))
    if report.duplicates:
        print("\nIgnored duplicate installs: " + ", ".join(report.duplicates))
    return strict_exit(report, "list")
