"""Checkpoints that prove their own integrity, and the run directory's layout.

A run directory holds::

    run.json                    what the run is (its config); marks the directory as a dspark run
    metrics.jsonl               one line per logged step (see ``metrics.py``)
    data/                       built-in demo data, when ``data: demo`` is used
    checkpoints/step-00000500/  one checkpoint:
        trainer_state.pt          trainable weights, optimizer, scheduler, loss history (CPU tensors)
        rng/rank-00000.pt         every rank's RNG states and its open metrics window
        draft/                    a ``save_pretrained`` export of the draft
        checkpoint.json           the manifest, written last: step, data position, world size, and
                                  the size and SHA-256 of every other file
    draft/                      the final export, a copy of the last checkpoint's ``draft/``, with
        dspark_export.json        its own manifest of sizes and hashes

A checkpoint is assembled in ``checkpoints/.tmp-step-...``, fsynced and renamed into place. It is
*complete* only when its manifest validates against its files (:func:`verify_directory`): a torn,
emptied or bit-flipped file, or a half-pruned directory (pruning deletes the manifest first), is not
a checkpoint. Manifests written before file hashes existed (``version`` 1) are checked for their
files' presence only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark_core.errors import DSparkError
from dspark_core.model_dirs import file_sha256
from dspark_core.training import faults

if TYPE_CHECKING:
    from dspark_core.training.distributed import DistributedContext

__all__ = [
    "EXPORT_DIR",
    "EXPORT_MANIFEST",
    "MANIFEST_NAME",
    "RUN_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "Checkpointer",
    "DiskFullError",
    "atomic_write_text",
    "fsync_tree",
    "replace_directory",
    "verify_directory",
    "verify_run",
]

MANIFEST_NAME = "checkpoint.json"
STATE_NAME = "trainer_state.pt"
RNG_DIR = "rng"
EXPORT_DIR = "draft"
EXPORT_MANIFEST = "dspark_export.json"
RUN_FILE = "run.json"
RUN_FORMAT = "dspark-train-run"
CHECKPOINT_FORMAT = "dspark-checkpoint"
MANIFEST_VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(DSparkError, RuntimeError):
    """A checkpoint or run directory is unusable (incomplete, corrupt, foreign, or from another run)."""


class DiskFullError(CheckpointError, OSError):
    """A checkpoint or export could not be written for lack of space (ENOSPC)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory on disk (complete once :func:`verify_directory` finds no problem)."""

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


# -- durable files ---------------------------------------------------------------------------------


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def json_text(record: Any) -> str:
    """Indented, key-sorted JSON with a final newline."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


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
    faults.point("export-copied")
    if destination.exists():
        os.replace(destination, old)
    os.replace(tmp, destination)
    _fsync_path(parent)
    if old.exists():
        shutil.rmtree(old)


# -- integrity -------------------------------------------------------------------------------------


def file_digests(root: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``root``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative not in exclude:
            out[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def _file_problems(root: Path, files: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for relative, expected in sorted(files.items()):
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(
                f"{relative} has {path.stat().st_size} bytes, the manifest says {expected.get('size')}"
            )
        elif file_sha256(path) != expected.get("sha256"):
            problems.append(f"{relative} does not match its SHA-256 in the manifest (corrupted)")
    return problems


def verify_directory(path: Path) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty when it is complete and intact)."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"no {MANIFEST_NAME} (an interrupted save or prune)"]
    try:
        manifest = read_json(manifest_path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = [
        f"the manifest lacks {key!r}" for key in ("step", "data_position", "config") if key not in manifest
    ]
    if manifest.get("format") != CHECKPOINT_FORMAT:
        problems.append(f"the manifest's format is {manifest.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    files = manifest.get("files")
    if isinstance(files, Mapping):
        problems += _file_problems(path, files)
    elif int(manifest.get("version", 1)) >= MANIFEST_VERSION:
        problems.append("the manifest lists no files")
    else:  # version 1 manifests predate file hashes: the files must at least be there
        problems += [f"{name} is missing" for name in (STATE_NAME, EXPORT_DIR) if not (path / name).exists()]
    return problems


def write_export_manifest(directory: Path, step: int) -> None:
    """Record the sizes and hashes of an exported draft, so that the export can be verified alone."""
    files = file_digests(directory, exclude=frozenset({EXPORT_MANIFEST}))
    atomic_write_text(directory / EXPORT_MANIFEST, json_text({"step": step, "files": files}))


def verify_export(directory: Path) -> list[str]:
    """What is wrong with an exported ``draft/`` directory (empty when it is intact)."""
    manifest_path = directory / EXPORT_MANIFEST
    if not manifest_path.is_file():
        return [f"no {EXPORT_MANIFEST}"]
    try:
        files = read_json(manifest_path).get("files")
    except CheckpointError as exc:
        return [str(exc)]
    if not isinstance(files, Mapping) or not any(name.endswith(".safetensors") for name in files):
        return ["the export manifest lists no weights (*.safetensors)"]
    return _file_problems(directory, files)


def verify_run(run_dir: Path) -> dict[str, list[str]]:
    """Every checkpoint of a run and its export, each with its problems (``dspark verify``)."""
    report: dict[str, list[str]] = {}
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if _STEP_DIR.match(entry.name) and entry.is_dir():
                report[f"checkpoints/{entry.name}"] = verify_directory(entry)
    if (run_dir / EXPORT_DIR).is_dir():
        report[EXPORT_DIR] = verify_export(run_dir / EXPORT_DIR)
    return report


# -- the checkpoints/ directory --------------------------------------------------------------------


class CheckpointManager:
    """The ``checkpoints/`` directory of a run: listing, validation, atomic commits and pruning."""

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

    def candidates(self) -> list[CheckpointInfo]:
        """Every ``step-*`` directory, oldest first, complete or not."""
        if not self.directory.is_dir():
            return []
        found = [
            CheckpointInfo(int(match.group(1)), entry)
            for entry in self.directory.iterdir()
            if (match := _STEP_DIR.match(entry.name)) and entry.is_dir()
        ]
        return sorted(found, key=lambda info: info.step)

    def complete(self) -> list[CheckpointInfo]:
        """The checkpoints whose manifest validates, oldest first."""
        return [info for info in self.candidates() if not verify_directory(info.path)]

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or ``None``."""
        done = self.complete()
        return done[-1] if done else None

    def newest_valid(self) -> tuple[CheckpointInfo | None, list[str]]:
        """Walk back from the newest checkpoint to the newest that validates; also returns a line per
        checkpoint skipped on the way, saying why."""
        skipped: list[str] = []
        for info in reversed(self.candidates()):
            problems = verify_directory(info.path)
            if not problems:
                return info, skipped
            skipped.append(f"{info.path.name} ({'; '.join(problems)})")
        return None, skipped

    def remove_stale(self) -> list[Path]:
        """Delete temporary directories of interrupted saves, and step directories an interrupted prune
        left without a manifest; returns what was removed."""
        if not self.directory.is_dir():
            return []
        removed = []
        for entry in self.directory.iterdir():
            half_pruned = _STEP_DIR.match(entry.name) and not (entry / MANIFEST_NAME).exists()
            if entry.name.startswith(_TMP_PREFIX) or half_pruned:
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
        """Hash every file into the manifest, write it last, fsync, and rename the temporary directory
        into place. Then delete all but the newest ``keep_last`` complete checkpoints."""
        tmp = self.temporary_path(step)
        if not tmp.is_dir():
            raise CheckpointError(f"no checkpoint of step {step} is being written ({tmp} is missing)")
        record = {**manifest, "version": MANIFEST_VERSION, "files": file_digests(tmp)}
        (tmp / MANIFEST_NAME).write_text(json_text(record), encoding="utf-8")
        fsync_tree(tmp)
        faults.point("checkpoint-written")
        final = self.directory / self.step_name(step)
        if final.exists():
            # Only a rerun of the same step (after --resume from an older checkpoint) gets here.
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_path(self.directory)
        self.prune()
        return CheckpointInfo(step, final)

    def prune(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond ``keep_last``; returns what was removed."""
        done = self.complete()
        removed = []
        for info in done[: max(0, len(done) - self.keep_last)]:
            _remove_checkpoint(info.path)
            removed.append(info.path)
        if removed:
            _fsync_path(self.directory)
        return removed


def _remove_checkpoint(path: Path) -> None:
    # The manifest goes first and durably: a prune killed half-way leaves no "complete" checkpoint.
    (path / MANIFEST_NAME).unlink(missing_ok=True)
    _fsync_path(path)
    faults.point("prune-manifest-removed")
    shutil.rmtree(path)


# -- the Checkpointer: what a training run saves and restores ---------------------------------------


@dataclass
class LoadedCheckpoint:
    """A validated checkpoint, read back: ``state`` (weights, optimizer, ...) and this rank's state."""

    info: CheckpointInfo
    manifest: dict[str, Any]
    state: dict[str, Any]
    rank_state: dict[str, Any] | None


class Checkpointer:
    """Saves, finds, loads and exports a run's checkpoints (collectively: every rank calls each method).

    Rank 0 writes the shared files; each rank writes its own ``rng/rank-N.pt``. A failure on rank 0 is
    raised on every rank (through ``ctx``), so no rank waits forever.
    """

    def __init__(self, run_dir: Path, keep_last: int, ctx: DistributedContext) -> None:
        self.run_dir = run_dir
        self.manager = CheckpointManager(run_dir / "checkpoints", keep_last)
        self.ctx = ctx

    def save(
        self,
        step: int,
        state: dict[str, Any],
        rank_state: dict[str, Any],
        manifest: dict[str, Any],
        export: Callable[[Path], None],
    ) -> CheckpointInfo:
        """Write ``step``'s checkpoint: ``state`` and ``export(dir)`` on rank 0, ``rank_state`` per rank."""
        import torch

        tmp = self.manager.temporary_path(step)
        self.ctx.on_main(lambda: self._guard_space(tmp, lambda: self.manager.begin(step)))
        self._guard_space(tmp, lambda: torch.save(rank_state, tmp / RNG_DIR / f"rank-{self.ctx.rank:05d}.pt"))
        self.ctx.barrier()

        def finish() -> CheckpointInfo:
            torch.save(state, tmp / STATE_NAME)
            faults.point("state-written")
            export(tmp / EXPORT_DIR)
            record = {"format": CHECKPOINT_FORMAT, "step": step, **manifest}
            return self.manager.commit(step, record)

        info: CheckpointInfo = self.ctx.on_main(lambda: self._guard_space(tmp, finish))
        return info

    def _guard_space(self, tmp: Path, work: Callable[[], Any]) -> Any:
        """Run ``work``; a full disk becomes one :class:`DiskFullError` naming the path and the bytes."""
        try:
            return work()
        except (OSError, RuntimeError) as exc:
            previous = self.manager.latest()
            written = _directory_size(tmp) if tmp.exists() else 0
            needed = max(_directory_size(previous.path) if previous else 0, written)
            free = shutil.disk_usage(self.run_dir).free
            if not _is_disk_full(exc, free, needed):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"; the previous checkpoint {previous.path} is intact" if previous else ""
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device (ENOSPC) writing {tmp}: a checkpoint needs about {needed:,} bytes "
                f"and {free:,} are free{kept}. Free space or move output_dir, then --resume",
            ) from exc

    def newest_valid(self, log: Callable[[str], None]) -> CheckpointInfo | None:
        """The newest checkpoint that validates (rank 0 decides); logs a line for each one skipped."""

        def find() -> tuple[CheckpointInfo | None, list[str]]:
            return self.manager.newest_valid()

        info, skipped = self.ctx.on_main(find)
        if skipped:
            log("skipped checkpoints that do not validate: " + ", ".join(skipped))
        if info is None and skipped:
            raise CheckpointError(
                f"cannot resume {self.run_dir}: no checkpoint validates ({len(skipped)} found, all damaged); "
                "pass --overwrite to start over"
            )
        return info

    def load(self, info: CheckpointInfo, *, saved_world_size: int) -> LoadedCheckpoint:
        """Read ``info``'s state, and this rank's RNG file when the world size is unchanged."""
        import torch

        state = torch.load(info.state_path, map_location="cpu", weights_only=True)
        rank_state = None
        if saved_world_size == self.ctx.world_size:
            rank_state = torch.load(info.rng_path(self.ctx.rank), map_location="cpu", weights_only=True)
        return LoadedCheckpoint(info, info.manifest, state, rank_state)

    def export_final(self, info: CheckpointInfo) -> Path:
        """Copy ``info``'s draft to ``RUN_DIR/draft`` and verify the copy before reporting it."""
        destination = self.run_dir / EXPORT_DIR

        def copy() -> None:
            replace_directory(info.export_path, destination)
            write_export_manifest(destination, info.step)
            problems = verify_export(destination)
            if problems:
                raise CheckpointError(
                    f"the exported draft {destination} does not verify: {'; '.join(problems)}"
                )

        self.ctx.on_main(copy)
        return destination


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_disk_full(exc: BaseException, free: int, needed: int) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    # torch.save reports any failed write as RuntimeError("... unexpected pos ..."), without an errno:
    # it is a full disk when the free space is short of a checkpoint's size.
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc) and free < max(needed, 1 << 20)
