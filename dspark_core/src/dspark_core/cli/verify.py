"""``dspark verify RUN``: check every checkpoint of a training run and its exported draft."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "check every checkpoint of a training run, and its exported draft, against their manifests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a training run directory (dspark train --output)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from dspark_core.training.checkpoint import RUN_FILE, quarantined, verify_run
    from dspark_core.training.run_dir import RunDirectoryError

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: no such directory")
    report = verify_run(run_dir)
    # Checkpoints a resume found damaged and moved aside: reported, not counted (they are not used).
    aside = [f"checkpoints/{path.name}" for path in quarantined(run_dir)]
    if not report and not (run_dir / RUN_FILE).is_file():
        raise RunDirectoryError(f"{run_dir} holds no training run (no {RUN_FILE}, no checkpoints, no draft/)")
    if args.json:
        print(
            json.dumps(
                {name: {"ok": not problems, "problems": problems} for name, problems in report.items()}
                | {name: {"ok": False, "problems": [], "quarantined": True} for name in aside}
            )
        )
    else:
        for name, problems in report.items():
            print(f"{name}: {'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}")
        for name in aside:
            print(f"{name}: quarantined (failed validation when the run resumed; not used, pruned later)")
        damaged = sum(1 for problems in report.values() if problems)
        print(f"{len(report) - damaged} ok, {damaged} damaged")
    return 1 if any(report.values()) else 0
