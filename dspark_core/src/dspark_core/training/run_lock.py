"""One training process per run directory: an exclusive ``flock`` on ``RUN_DIR/run.lock``.

The lock is held for the run's life and released by the kernel when the process ends, however it
ends, so a stale ``run.lock`` needs no cleanup: the next start simply takes it. The file records the
holder's pid and host, for the message that refuses a second start. Within one process the lock is
shared (a resumed ``Trainer`` built while an earlier one on the same directory is still alive); it is
the processes that must not interleave their writes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dspark_core.errors import DSparkError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = "run.lock"


class RunLockedError(DSparkError, RuntimeError):
    """Another process is training into the same run directory."""


@dataclass
class _Held:
    fd: int
    users: int


#: The locks this process holds, by the lock file's (device, inode).
_HELD: dict[tuple[int, int], _Held] = {}


class RunLock:
    """The lock of one run directory; :meth:`acquire` once, :meth:`release` when the run is over."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._key: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        if self._key is not None or fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        status = os.fstat(fd)
        key = (status.st_dev, status.st_ino)
        if key in _HELD and os.fstat(_HELD[key].fd).st_nlink == 0:
            # The file this process locked was deleted (its directory removed) and the inode number
            # reused: that lock guards nothing any more.
            os.close(_HELD.pop(key).fd)
        if key in _HELD:
            os.close(fd)
            _HELD[key].users += 1
            self._key = key
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another training run ({holder}); wait for it to end, "
                "or train into another output directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        _HELD[key] = _Held(fd, 1)
        self._key = key

    def release(self) -> None:
        """Give the lock back (the last user in this process unlocks it)."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        held = _HELD[key]
        held.users -= 1
        if held.users == 0:
            del _HELD[key]
            os.close(held.fd)  # closing the only descriptor releases the flock


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        pid, host = int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its process is just starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("since", 0))))
    return f"pid {pid} on host {host}, since {since}"
