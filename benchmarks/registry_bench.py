"""Startup cost of plugin discovery: `dspark list --json` against a bare entry-point scan.

Each measurement is a fresh process. Example plugins are real dist-info folders on PYTHONPATH,
each registering two architectures with lazy draft classes, as dspark-qwen3 does, and
byte-compiled as pip would install them.

    python benchmarks/registry_bench.py [--repeats 15]

Target: the median of `dspark list --json` is at most 2.0x the bare scan.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = "import importlib.metadata as m; m.entry_points(group='dspark.drafts')"

PLUGIN = """from dspark_core import DSparkDraftSpec, hookimpl

SPEC = DSparkDraftSpec("bench_family_{i}.modeling:Draft")


@hookimpl
def dspark_draft_specs():
    return {{"Bench{i}ForCausalLM": SPEC, "Bench{i}MoeForCausalLM": SPEC}}
"""


def make_site(root: Path, count: int) -> Path:
    site = root / f"site-{count}"
    for i in range(count):
        dist_info = site / f"bench_family_{i}-1.0.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: bench-family-{i}\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(f"[dspark.drafts]\nfamily{i} = bench_family_{i}.plugin\n")
        package = site / f"bench_family_{i}"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "plugin.py").write_text(PLUGIN.format(i=i))
    # pip byte-compiles what it installs; without this, PYTHONDONTWRITEBYTECODE=1 (set on some CI
    # machines) would make every run recompile the plugins, which no installed plugin does.
    compileall.compile_dir(str(site), quiet=1)
    return site


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    script = shutil.which("dspark", path=str(Path(sys.executable).parent))
    dspark = [script] if script else [sys.executable, "-m", "dspark_core.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"python {sys.version.split()[0]}, {args.repeats} fresh processes per cell, medians in ms")
        print(f"{'plugins':>7}  {'bare scan':>9}  {'dspark list --json':>18}  {'ratio':>5}")
        for count in (1, 50):
            site = make_site(Path(tmp), count)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
            subprocess.run(
                [*dspark, "list", "--json"], env=env, check=True, stdout=subprocess.DEVNULL
            )  # warm
            bare, listed = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
                bare.append(timed([sys.executable, "-c", BARE], env))
                listed.append(timed([*dspark, "list", "--json"], env))
            b, d = statistics.median(bare), statistics.median(listed)
            print(f"{count:>7}  {b * 1000:>9.1f}  {d * 1000:>18.1f}  {d / b:>5.2f}")


if __name__ == "__main__":
    main()
