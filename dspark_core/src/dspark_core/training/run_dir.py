"""The output-directory policy of a run: new, resumed, overwritten, or refused.

A directory is a run's once ``run.json`` is written, after the whole setup succeeded: a start that
fails (bad data, a mask token that collides) leaves nothing that blocks the corrected command.

One process trains into a directory at a time (:class:`~run_lock.RunLock`, taken by rank 0 before
anything is read or written). Every temporary entry the run itself writes is removed at the next
start, and never makes the directory look like someone else's: a kill at any point, the very first
writes included, leaves a directory that ``--resume`` (or the same command again) continues.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from dspark_core.errors import DSparkError
from dspark_core.training.checkpoint import (
    EXPORT_DIR,
    RUN_FILE,
    RUN_FORMAT,
    TMP_PREFIX,
    CheckpointManager,
    atomic_write_text,
    json_text,
    read_json,
)
from dspark_core.training.config import ConfigError, TrainConfig
from dspark_core.training.distributed import DistributedContext
from dspark_core.training.run_lock import LOCK_NAME, RunLock

__all__ = ["RunDirectory", "RunDirectoryError"]

METRICS_FILE = "metrics.jsonl"
#: What a run writes into its directory; anything else makes the directory someone else's.
RUN_ENTRIES = frozenset({RUN_FILE, METRICS_FILE, "checkpoints", EXPORT_DIR, "data", LOCK_NAME})
#: The temporary entries a run writes at its root (atomic writes of run.json and metrics.jsonl, the
#: final export's copy and the draft/ it replaces): its own leftovers after a kill, not foreign files.
RUN_TEMPORARIES = frozenset(
    f"{TMP_PREFIX}{name}" for name in (RUN_FILE, METRICS_FILE, EXPORT_DIR, f"old-{EXPORT_DIR}")
)


class RunDirectoryError(DSparkError, ValueError):
    """The output directory holds another run (or other files) and neither resume nor overwrite was given."""


class RunDirectory:
    """``config.output_dir`` and the decision whether this start resumes the run in it."""

    def __init__(self, config: TrainConfig, checkpoints: CheckpointManager, ctx: DistributedContext) -> None:
        self.config = config
        self.path = Path(config.output_dir)
        self.checkpoints = checkpoints
        self.ctx = ctx
        self.lock = RunLock(self.path)

    def prepare(self, log: Callable[[str], None]) -> bool:
        """Take the directory's lock (rank 0; the other ranks wait for its verdict), apply the policy
        (every rank decides, then rank 0 acts); returns whether this start resumes."""
        self.ctx.on_main(self.lock.acquire)
        run_file = self.path / RUN_FILE
        existing = read_json(run_file) if run_file.is_file() else None
        self._check(existing)
        self.ctx.barrier()
        resuming = existing is not None and self.config.resume

        def act() -> None:
            if self.config.overwrite:
                for name in (RUN_FILE, METRICS_FILE):
                    (self.path / name).unlink(missing_ok=True)
                for name in ("checkpoints", EXPORT_DIR, "data"):
                    shutil.rmtree(self.path / name, ignore_errors=True)
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.remove_temporaries():
                log(f"removed a temporary entry of an interrupted run: {stale}")

        self.ctx.on_main(act)
        return resuming

    def remove_temporaries(self) -> list[Path]:
        """Delete every temporary entry a run writes (root, ``checkpoints/``, ``draft/``); returns them."""
        removed = []
        for name in sorted(RUN_TEMPORARIES):
            entry = self.path / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
            else:
                continue
            removed.append(entry)
        export = self.path / EXPORT_DIR
        if export.is_dir():  # the export manifest's atomic write, as older versions placed it
            for entry in sorted(export.glob(f"{TMP_PREFIX}*")):
                entry.unlink()
                removed.append(entry)
        return removed + self.checkpoints.remove_stale()

    def release(self) -> None:
        """Give the directory's lock back (the kernel does it anyway when the process ends)."""
        self.lock.release()

    def _check(self, existing: dict[str, object] | None) -> None:
        config = self.config
        if config.overwrite:
            return
        if existing is None:
            if self.checkpoints.candidates():
                raise RunDirectoryError(
                    f"{self.path} holds checkpoints but no {RUN_FILE}, so it cannot be resumed safely; "
                    "restore run.json, or pass --overwrite to start over"
                )
            foreign = self.foreign_entries()
            if foreign:
                raise RunDirectoryError(
                    f"{self.path} is not empty and holds no dspark run (it has {', '.join(foreign[:5])}); "
                    "use a new or empty directory, or pass --overwrite to write the run into it"
                )
            return
        if existing.get("format") != RUN_FORMAT:
            raise RunDirectoryError(f"{self.path / RUN_FILE} is not a dspark training run file")
        if not config.resume:
            latest = self.checkpoints.latest()
            newest = f", newest checkpoint at step {latest.step}" if latest else ", no checkpoint yet"
            raise RunDirectoryError(
                f"{self.path} holds another training run ({RUN_FILE}{newest}); pass --resume to "
                "continue it or --overwrite to replace it"
            )
        saved = existing.get("config", {})
        differences = config.incompatibilities(saved if isinstance(saved, dict) else {})
        if differences:
            raise ConfigError(
                f"cannot resume the run in {self.path}: its config differs in "
                + "; ".join(differences)
                + ". Resume with the run's values, or pass --overwrite to start a new run"
            )

    def foreign_entries(self) -> list[str]:
        """Entries that no dspark run writes."""
        if not self.path.is_dir():
            return []
        own = RUN_ENTRIES | RUN_TEMPORARIES
        return sorted(p.name for p in self.path.iterdir() if p.name not in own)

    def claim(self) -> None:
        """Mark the directory as this run's, once the whole setup has succeeded."""
        record = {"format": RUN_FORMAT, "version": 2, "config": self.config.to_dict()}
        self.ctx.on_main(
            lambda: atomic_write_text(self.path / RUN_FILE, json_text(record), fault_point="run-json-written")
        )
