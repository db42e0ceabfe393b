"""The output-directory policy of a run: new, resumed, overwritten, or refused.

A directory is a run's once ``run.json`` is written, after the whole setup succeeded: a start that
fails (bad data, a mask token that collides) leaves nothing that blocks the corrected command.
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
    CheckpointManager,
    atomic_write_text,
    json_text,
    read_json,
)
from dspark_core.training.config import ConfigError, TrainConfig
from dspark_core.training.distributed import DistributedContext

__all__ = ["RunDirectory", "RunDirectoryError"]

#: What a run writes into its directory; anything else makes the directory someone else's.
RUN_ENTRIES = frozenset({RUN_FILE, "metrics.jsonl", "checkpoints", EXPORT_DIR, "data"})


class RunDirectoryError(DSparkError, ValueError):
    """The output directory holds another run (or other files) and neither resume nor overwrite was given."""


class RunDirectory:
    """``config.output_dir`` and the decision whether this start resumes the run in it."""

    def __init__(self, config: TrainConfig, checkpoints: CheckpointManager, ctx: DistributedContext) -> None:
        self.config = config
        self.path = Path(config.output_dir)
        self.checkpoints = checkpoints
        self.ctx = ctx

    def prepare(self, log: Callable[[str], None]) -> bool:
        """Apply the policy (every rank decides, then rank 0 acts); returns whether this start resumes."""
        run_file = self.path / RUN_FILE
        existing = read_json(run_file) if run_file.is_file() else None
        self._check(existing)
        self.ctx.barrier()
        resuming = existing is not None and self.config.resume

        def act() -> None:
            if self.config.overwrite:
                for name in (RUN_FILE, "metrics.jsonl"):
                    (self.path / name).unlink(missing_ok=True)
                for name in ("checkpoints", EXPORT_DIR, "data"):
                    shutil.rmtree(self.path / name, ignore_errors=True)
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoints.remove_stale():
                log(f"removed an interrupted checkpoint save or prune: {stale}")

        self.ctx.on_main(act)
        return resuming

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
        return sorted(p.name for p in self.path.iterdir() if p.name not in RUN_ENTRIES)

    def claim(self) -> None:
        """Mark the directory as this run's, once the whole setup has succeeded."""
        record = {"format": RUN_FORMAT, "version": 2, "config": self.config.to_dict()}
        self.ctx.on_main(lambda: atomic_write_text(self.path / RUN_FILE, json_text(record)))
