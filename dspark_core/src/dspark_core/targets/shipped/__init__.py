"""The pretrained embedded target shipped with dspark-core, and installing a copy of it.

``scripts/build_shipped_target.py`` produces ``qwen3-stdlib/``; its ``dspark_target.json`` records
that script's arguments, the corpus and the held-out perplexity, and lists every file's sha256, so
a copy is verified before it is used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dspark_core.errors import DSparkError
from dspark_core.model_dirs import file_sha256

SHIPPED_DIR = Path(__file__).parent / "qwen3-stdlib"
RECORD_NAME = "dspark_target.json"
FILES_KEY = "files_sha256"


def seal(directory: Path) -> dict[str, Any]:
    """Add every file's sha256 to the folder's record (the build script's last step)."""
    record_path = directory / RECORD_NAME
    record = json.loads(record_path.read_text())
    record[FILES_KEY] = {
        p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != RECORD_NAME
    }
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return dict(record)


def verify(directory: Path) -> dict[str, Any]:
    """The folder's record, after checking every listed file's hash; one clear error otherwise."""
    try:
        record = json.loads((directory / RECORD_NAME).read_text())
        expected = dict(record[FILES_KEY])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DSparkError(f"{directory / RECORD_NAME}: missing or unreadable target record ({exc})") from exc
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            raise DSparkError(
                f"{path}: missing or corrupt (sha256 differs from {RECORD_NAME}); "
                "reinstall dspark-core, or delete the folder and run the command again"
            )
    return dict(record)


def install_shipped_target(output_dir: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """Copy the shipped target into ``output_dir`` (atomically); reuse an identical verified copy.

    Returns (directory, record, reused).
    """
    if not (SHIPPED_DIR / RECORD_NAME).is_file():
        raise DSparkError(
            f"this dspark-core has no shipped target ({SHIPPED_DIR} is missing); build one with "
            "`dspark make-tiny-target DIR --pretrain`"
        )
    shipped = verify(SHIPPED_DIR)
    out = Path(output_dir)
    if (out / RECORD_NAME).is_file():
        try:
            existing = verify(out)
        except DSparkError:
            existing = {}
        if existing.get(FILES_KEY) == shipped[FILES_KEY]:
            return out, existing, True
        if any(out.iterdir()):
            raise DSparkError(f"{out} holds a different target; choose another folder or delete it")
    elif out.exists() and any(out.iterdir()):
        raise DSparkError(f"{out} exists and is not an embedded target; choose another folder or delete it")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(SHIPPED_DIR, staging, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    verify(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return out, shipped, False
