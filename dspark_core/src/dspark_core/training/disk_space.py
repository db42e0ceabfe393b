"""A full disk, recognised wherever a run writes, and reported as one line.

Each library reports ENOSPC its own way: ``OSError(errno 28)`` from Python, a ``SafetensorError``
mentioning "os error 28", a ``shutil.Error`` listing every file that failed, a ``RuntimeError``
("unexpected pos") from ``torch.save``. :func:`guard_disk_space` turns all of them into one
:class:`DiskFullError` naming what was being written and how many bytes it needs, after removing
the partial write.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dspark_core.errors import DSparkError

__all__ = ["DiskFullError", "directory_size", "guard_disk_space", "is_disk_full"]

_ENOSPC_TEXTS = ("no space left on device", "os error 28", "[errno 28]")


class DiskFullError(DSparkError, OSError):
    """A file of the run could not be written for lack of space (ENOSPC)."""

    def __init__(self, path: str | Path, needed: int, advice: str = "") -> None:
        self.path = Path(path)
        self.needed = needed
        self.message = f"no space left on device writing {path} ({needed} bytes needed)"
        if advice:
            self.message += f"; {advice}"
        super().__init__(self.message)
        self.errno = errno.ENOSPC
        self.filename = str(path)

    def __str__(self) -> str:
        return self.message


def directory_size(path: Path) -> int:
    """Bytes in the files under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, *, free: int | None = None, needed: int = 0) -> bool:
    """Whether ``exc`` (or an exception it came from) reports a full disk.

    ``torch.save`` reports any failed write as ``RuntimeError("... unexpected pos ...")`` without an
    errno: that counts as a full disk when ``free`` bytes are short of ``needed`` (or of 1 MiB).
    """
    for item in _chain(exc):
        if isinstance(item, DiskFullError):
            return True
        if isinstance(item, OSError) and item.errno == errno.ENOSPC:
            return True
        text = str(item).lower()
        if any(marker in text for marker in _ENOSPC_TEXTS):
            return True
        if isinstance(item, RuntimeError) and "unexpected pos" in text and free is not None:
            return free < max(needed, 1 << 20)
    return False


@contextlib.contextmanager
def guard_disk_space(
    path: Path,
    needed: Callable[[], int],
    *,
    cleanup: Callable[[], None] = lambda: None,
    advice: Callable[[], str] = lambda: "",
) -> Iterator[None]:
    """Run the block; when it fails for lack of space, ``cleanup()`` and raise :class:`DiskFullError`.

    ``path`` is what the message names, ``needed()`` the bytes the whole write needs, and
    ``advice()`` what the message adds (e.g. that the previous checkpoint is intact). Other errors
    pass through unchanged (``cleanup`` is not run for them).
    """
    try:
        yield
    except DiskFullError:
        cleanup()
        raise
    except Exception as exc:
        try:
            wanted = needed()
        except OSError:  # the estimate must not hide the original error
            wanted = 0
        free = _free_bytes(path)
        if not is_disk_full(exc, free=free, needed=wanted):
            raise
        cleanup()
        raise DiskFullError(path, wanted, advice()) from exc


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None
