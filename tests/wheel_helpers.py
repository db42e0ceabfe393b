"""Build a distribution as a real wheel and install it into a fresh virtual environment.

Not a test module. The venv is created without pip, and a ``.pth`` file puts this interpreter's
site-packages behind its own, so what the tests run under (dspark-core, dspark-qwen3, torch,
transformers) is importable beside the freshly installed wheel, whose ``.dist-info`` and entry
points are the ones pip wrote.
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(project: Path, out: Path) -> Path:
    """``pip wheel`` the project at ``project`` into ``out``; returns the wheel's path.

    With the build backend (hatchling) importable here the build is offline (``--no-build-isolation``);
    otherwise pip fetches it into an isolated build environment.
    """
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation, "-w", str(out)]
    _run([*command, str(project)])
    (wheel,) = out.glob("*.whl")
    return wheel


def make_venv(root: Path) -> Path:
    """A new virtual environment at ``root`` that also sees this interpreter's packages; returns its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    # addsitedir (not a bare path line) so the outer site's own .pth files, e.g. editable installs, apply too.
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    Path(purelib, "_outer_site.pth").write_text(lines)
    return python


def pip_install(python: Path, wheel: Path) -> None:
    """Install ``wheel`` (no dependencies, no index) into the environment of ``python``."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    _run([*command, "--quiet", str(wheel)])


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}")
