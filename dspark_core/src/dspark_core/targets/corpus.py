"""The embedded corpus: the Python standard library's own source, split by file.

Every machine that runs dspark has it, so nothing is downloaded. Files are split into a training
and a held-out part by a hash of their path relative to the library root, so the split is the same
on every machine and for every consumer (the target's pretraining, the demo data, evaluation).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Split = Literal["train", "heldout"]

#: Directories skipped: the stdlib's own test suites are large, repetitive and full of fixtures.
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"})
#: One file in this many (by path hash) is held out.
HELDOUT_EVERY = 10


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> Split:
    """The split a file belongs to, from a hash of its ``/``-separated relative path."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % HELDOUT_EVERY == 0 else "train"


@dataclass(frozen=True)
class CorpusFile:
    """One source file of the corpus."""

    relative_path: str
    path: Path

    @property
    def split(self) -> Split:
        return split_of(self.relative_path)

    def read(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Corpus:
    """The corpus files, sorted by relative path, and where they came from."""

    root: Path
    files: list[CorpusFile] = field(default_factory=list)

    @classmethod
    def stdlib(cls, root: Path | None = None) -> Corpus:
        """Every ``.py`` file under the standard library, minus :data:`EXCLUDED_PARTS`."""
        base = root or stdlib_root()
        found = []
        for path in base.rglob("*.py"):
            relative = path.relative_to(base)
            if EXCLUDED_PARTS.isdisjoint(relative.parts):
                found.append(CorpusFile(relative.as_posix(), path))
        found.sort(key=lambda f: f.relative_path)
        if not found:
            raise FileNotFoundError(f"no Python source files under {base}: the corpus is empty")
        return cls(base, found)

    def split(self, which: Split) -> list[CorpusFile]:
        return [f for f in self.files if f.split == which]

    def texts(self, which: Split) -> Iterator[str]:
        for f in self.split(which):
            yield f.read()

    def record(self) -> dict[str, Any]:
        """What a built artefact records about its corpus: enough to tell whether it is the same."""
        listing = "\n".join(f.relative_path for f in self.files).encode()
        return {
            "name": "python-stdlib",
            "python_version": platform.python_version(),
            "num_files": len(self.files),
            "num_heldout_files": len(self.split("heldout")),
            "file_list_sha256": hashlib.sha256(listing).hexdigest(),
            "heldout_every": HELDOUT_EVERY,
        }
