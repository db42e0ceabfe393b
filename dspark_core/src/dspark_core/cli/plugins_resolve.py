"""``dspark resolve``: which draft a target config gets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark_core.cli import print_warning
from dspark_core.cli.plugins_list import discovery_report
from dspark_core.errors import DraftConfigError, DSparkPluginWarning
from dspark_core.registry import DSPARK_DRAFT_REGISTRY

HELP = "show the draft spec resolved for architectures or a target config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "architectures", nargs="*", metavar="ARCH", help="architecture names, in priority order"
    )
    parser.add_argument("--config", type=Path, help="a target config.json (or its directory)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def architectures_from_config(path: Path) -> list[str]:
    """The ``architectures`` field of a HF config.json, with errors that name the file."""
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DraftConfigError(f"config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DraftConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not architectures:
        raise DraftConfigError(
            f"config file {str(path)!r} has no 'architectures' list; set it, e.g. [\"Qwen3ForCausalLM\"]"
        )
    return [str(name) for name in architectures]


def run(args: argparse.Namespace) -> int:
    if bool(args.architectures) == bool(args.config):
        raise DraftConfigError("give either architecture names or --config, not both and not neither")
    names = architectures_from_config(args.config) if args.config else list(args.architectures)
    report = discovery_report()
    entry = DSPARK_DRAFT_REGISTRY.resolve_entry(names)  # a not-found error names the failures itself
    for failure in report.failures:  # a failed plugin might have registered an earlier architecture
        print_warning(DSparkPluginWarning, f"skipping dspark {failure}")
    info = entry.plugin
    if args.json:
        payload = {
            "requested": names,
            "architecture": entry.architecture,
            "draft_class": entry.reference,
            "plugin": info.name,
            "distribution": info.distribution,
            "version": info.version,
        }
        print(json.dumps(payload, indent=2))
    else:
        print(f"{entry.architecture} -> {entry.reference} ({info.label})")
    return 0
