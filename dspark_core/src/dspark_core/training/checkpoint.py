"""Atomic training checkpoints and the run directory's layout.

A run directory holds::

    run.json                    what the run is (its config); marks the directory as a dspark run
    metrics.jsonl               one line per logged step (see ``metrics.py``)
    data/                       built-in demo data, when ``data: demo`` is used
    checkpoints/step-00000500/  one complete checkpoint:
        trainer_state.pt          trainable weights, optimizer, scheduler (unsharded, CPU tensors)
        rng/rank-00000.pt         every rank's RNG states
        draft/                    a ``save_pretrained`` export of the draft
        checkpoint.json           the manifest: step, data position, world size; written last
    draft/                      the final export, a copy of the last checkpoint's ``draft/``

A checkpoint is written into ``checkpoints/.tmp-step-...``, every file and directory is fsynced,
and the directory is then renamed to ``step-...``: a rename is atomic, so a directory named
``step-*`` that has a manifest is complete, and a run killed mid-save leaves only a temporary
directory that the next start deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_core.errors import DSparkError

__all__ = [
    "MANIFEST_NAME",
    "RUN_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "atomic_write_text",
    "fsync_tree",
    "replace_directory",
]

MANIFEST_NAME = "checkpoint.json"
STATE_NAME = "trainer_state.pt"
RNG_DIR = "rng"
EXPORT_DIR = "draft"
RUN_FILE = "run.json"
RUN_FORMAT = "dspark-train-run"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(DSparkError, RuntimeError):
    """A checkpoint or run directory is unusable (incomplete, foreign, or from another run)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    step: int
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        """The decoded ``checkpoint.json``."""
        return read_json(self.path / MANIFEST_NAME)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_NAME

    @property
    def export_path(self) -> Path:
        """The ``save_pretrained`` draft inside the checkpoint."""
        return self.path / EXPORT_DIR

    def rng_path(self, rank: int) -> Path:
        return self.path / RNG_DIR / f"rank-{rank:05d}.pt"


def _fsync_path(path: Path) -> None:
    # Directories are fsynced too: that is what makes a new entry or a rename durable.
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, then ``root`` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    """Decode a JSON object file, with a :class:`CheckpointError` naming the file on failure."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def replace_directory(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination``, replacing it, such that ``destination`` is never half-written.

    The copy goes to a fsynced temporary sibling first; the old ``destination`` is moved aside only
    once the copy is complete, then removed.
    """
    parent = destination.parent
    tmp = parent / f"{_TMP_PREFIX}{destination.name}"
    old = parent / f"{_TMP_PREFIX}old-{destination.name}"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    shutil.copytree(source, tmp)
    fsync_tree(tmp)
    if destination.exists():
        os.replace(destination, old)
    os.replace(tmp, destination)
    _fsync_path(parent)
    if old.exists():
        shutil.rmtree(old)


class CheckpointManager:
    """The ``checkpoints/`` directory of a run: listing, atomic commits and pruning to ``keep_last``."""

    def __init__(self, directory: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def step_name(step: int) -> str:
        return f"step-{step:08d}"

    def temporary_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is assembled before its commit."""
        return self.directory / f"{_TMP_PREFIX}{self.step_name(step)}"

    def complete(self) -> list[CheckpointInfo]:
        """The complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found: list[CheckpointInfo] = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / MANIFEST_NAME).is_file():
                found.append(CheckpointInfo(int(match.group(1)), entry))
        return sorted(found, key=lambda info: info.step)

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or ``None``."""
        done = self.complete()
        return done[-1] if done else None

    def remove_stale(self) -> list[Path]:
        """Delete the temporary directories left by interrupted saves; returns what was removed."""
        if not self.directory.is_dir():
            return []
        removed = []
        for entry in self.directory.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
        return removed

    def begin(self, step: int) -> Path:
        """Create (afresh) the temporary directory of ``step``'s checkpoint and return it."""
        tmp = self.temporary_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / RNG_DIR).mkdir(parents=True)
        return tmp

    def commit(self, step: int, manifest: Mapping[str, Any]) -> CheckpointInfo:
        """Write the manifest, fsync, and atomically rename the temporary directory into place.

        Then delete all but the newest ``keep_last`` complete checkpoints.
        """
        tmp = self.temporary_path(step)
        if not tmp.is_dir():
            raise CheckpointError(f"no checkpoint of step {step} is being written ({tmp} is missing)")
        (tmp / MANIFEST_NAME).write_text(
            json.dumps(dict(manifest), indent=2, sort_keys=True), encoding="utf-8"
        )
        fsync_tree(tmp)
        final = self.directory / self.step_name(step)
        if final.exists():
            # Only a rerun of the same step (after --resume from an older checkpoint) gets here.
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(self.directory)
        self.prune()
        return CheckpointInfo(step, final)

    def prune(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond ``keep_last``; returns what was removed."""
        done = self.complete()
        removed = []
        for info in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(info.path)
            removed.append(info.path)
        if removed:
            _fsync_path(self.directory)
        return removed
