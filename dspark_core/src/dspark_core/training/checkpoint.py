"""Checkpoints that prove their own integrity, and the run directory's layout.

A run directory holds::

    run.json                    what the run is (its config); marks the directory as a dspark run
    run.lock                    flock'ed by the one process training into the directory (see run_lock.py)
    metrics.jsonl               one line per logged step (see ``metrics.py``)
    data/                       built-in demo data, when ``data: demo`` is used
    checkpoints/step-00000500/  one checkpoint:
        trainer_state.pt          trainable weights, optimizer, scheduler, loss history (CPU tensors)
        rng/rank-00000.pt         every rank's RNG states and its open metrics window
        draft/                    a ``save_pretrained`` export of the draft
        checkpoint.json           the manifest, written last: step, data position, world size, the
                                  size and SHA-256 of every other file, and the SHA-256 of its own
                                  canonical content (``manifest_sha256``)
    checkpoints/step-00000400.invalid/  a checkpoint that failed validation, moved aside (never
                                  deleted on sight); pruned with the valid checkpoints older than it
    draft/                      the final export, a copy of the last checkpoint's ``draft/``, with
        dspark_export.json        its own manifest of sizes and hashes

A checkpoint is assembled in ``checkpoints/.tmp-step-...``, fsynced and renamed into place. It is
*complete* only when its manifest validates against itself and its files (:func:`verify_directory`):
an edited or bit-flipped manifest, a torn, emptied or bit-flipped file, or a directory without its
manifest is not a checkpoint. Pruning renames a checkpoint to ``.tmp-prune-...`` before deleting it,
so a kill mid-prune leaves only a temporary entry. Manifests written before their own digest existed
(``version`` 2) are checked against their files only, and before file hashes (``version`` 1) for
their files' presence only.

Every temporary entry a run writes starts with ``.tmp-`` (:data:`TMP_PREFIX`); a start removes them.
"""

from __future__ import annotations

import hashlib
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
from dspark_core.training.disk_space import DiskFullError, directory_size, guard_disk_space

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
MANIFEST_VERSION = 3
#: The manifest key holding the SHA-256 of the manifest's own canonical content (version 3 on).
MANIFEST_DIGEST = "manifest_sha256"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_QUARANTINED_DIR = re.compile(r"^step-(\d+)\.invalid(?:-\d+)?$")
TMP_PREFIX = ".tmp-"
_TMP_PREFIX = TMP_PREFIX


class CheckpointError(DSparkError, RuntimeError):
    """A checkpoint or run directory is unusable (incomplete, corrupt, foreign, or from another run)."""


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


def atomic_write_text(path: Path, text: str, *, fault_point: str | None = None) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename.

    The temporary file is removed when the write fails; a full disk raises :class:`DiskFullError`.
    ``fault_point`` names the crash point between the temporary file and the rename.
    """
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    data = text.encode("utf-8")
    try:
        with guard_disk_space(path, lambda: len(data)), tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fault_point is not None:
        faults.point(fault_point)
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


def replace_directory(
    source: Path, destination: Path, *, finish: Callable[[Path], None] = lambda _tmp: None
) -> None:
    """Copy ``source`` to ``destination``, replacing it, such that ``destination`` is never half-written.

    The copy goes to a fsynced temporary sibling first and ``finish(copy)`` completes it (e.g. with a
    manifest); the old ``destination`` is moved aside only once the copy is complete, then removed. A
    failed copy leaves no temporary entry; a full disk raises :class:`DiskFullError`.
    """
    parent = destination.parent
    tmp = parent / f"{_TMP_PREFIX}{destination.name}"
    old = parent / f"{_TMP_PREFIX}old-{destination.name}"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        with guard_disk_space(destination, lambda: directory_size(source)):
            shutil.copytree(source, tmp)
            finish(tmp)
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        if not isinstance(expected, Mapping):
            problems.append(f"{relative} has no size and SHA-256 in the manifest")
        elif not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(
                f"{relative} has {path.stat().st_size} bytes, the manifest says {expected.get('size')}"
            )
        elif file_sha256(path) != expected.get("sha256"):
            problems.append(f"{relative} does not match its SHA-256 in the manifest (corrupted)")
    return problems


def manifest_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical content: compact, key-sorted JSON of every key but the digest."""
    body = {key: value for key, value in record.items() if key != MANIFEST_DIGEST}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sealed(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with its own digest added under :data:`MANIFEST_DIGEST`."""
    return {**record, MANIFEST_DIGEST: manifest_digest(record)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seal_problems(path: Path, manifest: Mapping[str, Any], *, required: bool) -> list[str]:
    """Whether the manifest at ``path`` matches its own digest; checked before any field is used."""
    if MANIFEST_DIGEST not in manifest:
        return [f"{path} has no {MANIFEST_DIGEST} (its own digest)"] if required else []
    try:
        expected = manifest_digest(manifest)
    except ValueError as exc:  # NaN or infinity cannot be hashed canonically: not written by dspark
        return [f"{path} is damaged ({exc})"]
    if manifest[MANIFEST_DIGEST] != expected:
        return [f"{path} does not match its own digest (edited or corrupted)"]
    return []


def verify_directory(path: Path) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty when it is complete and intact).

    The manifest is checked against its own digest before any of its fields is trusted, then its
    fields' types (the step must be the directory's), then every file against the manifest.
    """
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"no {MANIFEST_NAME} (an interrupted save or prune, or a lost manifest)"]
    try:
        manifest = read_json(manifest_path)
    except CheckpointError as exc:
        return [str(exc)]
    version = manifest.get("version", 1)
    if not _is_int(version):
        return [f"{manifest_path} has a non-integer version {version!r}"]
    problems = _seal_problems(manifest_path, manifest, required=version >= 3)
    if problems:
        return problems
    problems = [
        f"the manifest lacks {key!r}" for key in ("step", "data_position", "config") if key not in manifest
    ]
    problems += _field_problems(path, manifest_path, manifest)
    if manifest.get("format") != CHECKPOINT_FORMAT:
        problems.append(f"the manifest's format is {manifest.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    files = manifest.get("files")
    if isinstance(files, Mapping):
        problems += _file_problems(path, files)
    elif version >= 2:
        problems.append("the manifest lists no files")
    else:  # version 1 manifests predate file hashes: the files must at least be there
        problems += [f"{name} is missing" for name in (STATE_NAME, EXPORT_DIR) if not (path / name).exists()]
    return problems


def _field_problems(path: Path, manifest_path: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The manifest fields a resume reads, each of the type it needs (also for unsealed old versions)."""
    problems = []
    step: Any = manifest.get("step")
    match = _STEP_DIR.match(path.name)
    if "step" in manifest and not (_is_int(step) and step >= 0):
        problems.append(f"{manifest_path}: step {step!r} is not a non-negative integer")
    elif match and "step" in manifest and step != int(match.group(1)):
        problems.append(f"{manifest_path}: step {step} is not the directory's step {int(match.group(1))}")
    position = manifest.get("data_position")
    valid_position = (
        isinstance(position, Mapping)
        and {"epoch", "index"} <= position.keys()
        and all(_is_int(position[k]) and position[k] >= 0 for k in ("epoch", "index"))
    )
    if "data_position" in manifest and not valid_position:
        problems.append(
            f"{manifest_path}: data_position {position!r} is not {{epoch, index}} of integers >= 0"
        )
    world = manifest.get("world_size", 1)
    if not (_is_int(world) and world >= 1):
        problems.append(f"{manifest_path}: world_size {world!r} is not an integer >= 1")
    if "config" in manifest and not isinstance(manifest["config"], Mapping):
        problems.append(f"{manifest_path}: config is not an object")
    return problems


def write_export_manifest(directory: Path, step: int) -> None:
    """Record the sizes and hashes of an exported draft (and the record's own digest), so that the
    export can be verified alone."""
    files = file_digests(directory, exclude=frozenset({EXPORT_MANIFEST}))
    atomic_write_text(directory / EXPORT_MANIFEST, json_text(sealed({"step": step, "files": files})))


def verify_export(directory: Path) -> list[str]:
    """What is wrong with an exported ``draft/`` directory (empty when it is intact)."""
    manifest_path = directory / EXPORT_MANIFEST
    if not manifest_path.is_file():
        return [f"no {EXPORT_MANIFEST}"]
    try:
        manifest = read_json(manifest_path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = _seal_problems(manifest_path, manifest, required=False)
    if problems:
        return problems
    files = manifest.get("files")
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


def quarantined(run_dir: Path) -> list[Path]:
    """The checkpoints of a run that failed validation and were moved aside (``step-N.invalid``)."""
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if _QUARANTINED_DIR.match(p.name) and p.is_dir())


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

    def newest_valid(self, *, quarantine: bool = False) -> tuple[CheckpointInfo | None, list[str]]:
        """Walk back from the newest checkpoint to the newest that validates; also returns a line per
        checkpoint skipped on the way, saying why. With ``quarantine``, each one skipped is moved
        aside to ``step-N.invalid`` once a valid one is found (the line says so); when none
        validates, nothing is moved, so that the failure is seen again and ``dspark verify`` too."""
        skipped: list[tuple[CheckpointInfo, str]] = []
        for info in reversed(self.candidates()):
            problems = verify_directory(info.path)
            if not problems:
                lines = [
                    f"{bad.path.name} ({why})"
                    + (f", moved aside to {self.quarantine(bad.path).name}" if quarantine else "")
                    for bad, why in skipped
                ]
                return info, lines
            skipped.append((info, "; ".join(problems)))
        return None, [f"{bad.path.name} ({why})" for bad, why in skipped]

    def quarantine(self, path: Path) -> Path:
        """Rename a checkpoint that failed validation to ``step-N.invalid`` (``.invalid-2``, ... when
        taken); it is deleted only by :meth:`prune`, once valid checkpoints newer than it are kept."""
        destination = path.with_name(f"{path.name}.invalid")
        suffix = 2
        while destination.exists():
            destination = path.with_name(f"{path.name}.invalid-{suffix}")
            suffix += 1
        os.replace(path, destination)
        _fsync_path(self.directory)
        return destination

    def quarantined(self) -> list[tuple[int, Path]]:
        """The ``step-N.invalid`` directories, with their steps."""
        if not self.directory.is_dir():
            return []
        return sorted(
            (int(match.group(1)), entry)
            for entry in self.directory.iterdir()
            if (match := _QUARANTINED_DIR.match(entry.name)) and entry.is_dir()
        )

    def remove_stale(self) -> list[Path]:
        """Delete the temporary entries (``.tmp-*``) of interrupted saves and prunes; returns them.

        A step directory without a manifest is not deleted here: it may hold intact files, so a
        resume quarantines it like any checkpoint that does not validate.
        """
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
        """Hash every file into the manifest, write it last, fsync, and rename the temporary directory
        into place. Then delete all but the newest ``keep_last`` complete checkpoints."""
        tmp = self.temporary_path(step)
        if not tmp.is_dir():
            raise CheckpointError(f"no checkpoint of step {step} is being written ({tmp} is missing)")
        record = sealed({**manifest, "version": MANIFEST_VERSION, "files": file_digests(tmp)})
        (tmp / MANIFEST_NAME).write_text(json_text(record), encoding="utf-8")
        fsync_tree(tmp)
        faults.point("checkpoint-written")
        final = self.directory / self.step_name(step)
        if final.exists():
            # Only a rerun of the same step gets here: a valid twin is recomputed identically, a
            # damaged one is kept aside like any other.
            if verify_directory(final):
                self.quarantine(final)
            else:
                self._remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_path(self.directory)
        self.prune()
        return CheckpointInfo(step, final)

    def prune(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond ``keep_last``, and the quarantined ones older
        than every checkpoint kept; returns what was removed."""
        done = self.complete()
        removed = []
        for info in done[: max(0, len(done) - self.keep_last)]:
            self._remove_checkpoint(info.path)
            removed.append(info.path)
        kept = done[max(0, len(done) - self.keep_last) :]
        if len(kept) >= self.keep_last:  # where a valid checkpoint of its step would be pruned
            for step, path in self.quarantined():
                if step < kept[0].step:
                    self._remove_checkpoint(path)
                    removed.append(path)
        if removed:
            _fsync_path(self.directory)
        return removed

    def _remove_checkpoint(self, path: Path) -> None:
        # Renamed first, atomically: a prune killed half-way leaves a temporary entry, never a
        # step directory without its manifest.
        doomed = self.directory / f"{_TMP_PREFIX}prune-{path.name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        _fsync_path(self.directory)
        faults.point("prune-moved-aside")
        shutil.rmtree(doomed)


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
        final = self.manager.directory / self.manager.step_name(step)

        def needed() -> int:
            # The previous checkpoint's size, or the tensors to write: state, and the draft again.
            previous = self.manager.latest()
            estimate = _tensor_bytes(state) + _tensor_bytes(state.get("model")) + _tensor_bytes(rank_state)
            return max(directory_size(previous.path) if previous else 0, directory_size(tmp), estimate)

        def advice() -> str:
            previous = self.manager.latest()
            kept = f"the previous checkpoint {previous.path} is intact; " if previous else ""
            return f"{kept}free space or move output_dir, then --resume"

        def guarded(work: Callable[[], Any]) -> Any:
            def cleanup() -> None:
                shutil.rmtree(tmp, ignore_errors=True)

            with guard_disk_space(final, needed, cleanup=cleanup, advice=advice):
                return work()

        self.ctx.on_main(lambda: guarded(lambda: self.manager.begin(step)))
        guarded(lambda: torch.save(rank_state, tmp / RNG_DIR / f"rank-{self.ctx.rank:05d}.pt"))
        self.ctx.barrier()

        def finish() -> CheckpointInfo:
            torch.save(state, tmp / STATE_NAME)
            faults.point("state-written")
            export(tmp / EXPORT_DIR)
            record = {"format": CHECKPOINT_FORMAT, "step": step, **manifest}
            return self.manager.commit(step, record)

        info: CheckpointInfo = self.ctx.on_main(lambda: guarded(finish))
        return info

    def newest_valid(self, log: Callable[[str], None]) -> CheckpointInfo | None:
        """The newest checkpoint that validates (rank 0 decides); logs a line for each one skipped."""

        def find() -> tuple[CheckpointInfo | None, list[str]]:
            return self.manager.newest_valid(quarantine=True)

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
            # The manifest is written into the copy before it replaces draft/: a full disk or a kill
            # at any point leaves the old draft/ or the new one, whole, and no temporary entry.
            replace_directory(
                info.export_path, destination, finish=lambda tmp: write_export_manifest(tmp, info.step)
            )
            problems = verify_export(destination)
            if problems:
                raise CheckpointError(
                    f"the exported draft {destination} does not verify: {'; '.join(problems)}"
                )

        self.ctx.on_main(copy)
        return destination


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested dict/list of tensors (anything else counts 0)."""
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    numel, element_size = getattr(value, "numel", None), getattr(value, "element_size", None)
    if callable(numel) and callable(element_size):
        return int(numel()) * int(element_size())
    return 0
