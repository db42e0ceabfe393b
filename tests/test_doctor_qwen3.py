"""With dspark-qwen3 installed, ``dspark doctor`` passes and lists both Qwen3 architectures as ok,
and ``dspark list --json`` shows both with status ok. Run as real subprocesses of the installed
console script, so the entry points come from the installed distribution's metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
DRAFT_CLASS = "dspark_qwen3.modeling:Qwen3DSparkModel"
SELECTION_VARIABLES = (
    "DSPARK_DISABLE_PLUGINS",
    "DSPARK_PLUGINS",
    "DSPARK_DISABLE_PLUGIN_AUTOLOAD",
    "DSPARK_STRICT_PLUGINS",
)


def dspark(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / ("dspark.exe" if os.name == "nt" else "dspark")
    assert script.is_file(), f"the dspark console script is not installed next to {sys.executable}"
    environment = {k: v for k, v in os.environ.items() if k not in SELECTION_VARIABLES}
    environment.update(env)
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=environment, timeout=300, check=False
    )


def test_doctor_passes_and_lists_both_qwen3_architectures() -> None:
    result = dspark("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    families = dict(zip(ARCHITECTURES, ("qwen3", "qwen3-moe"), strict=True))
    for architecture in ARCHITECTURES:
        expected = f"ok       {architecture} -> dspark_qwen3.modeling.Qwen3DSparkModel"
        (line,) = [line for line in lines if line.startswith(expected)]
        assert "dspark-qwen3" in line and "config_class Qwen3Config" in line, line
        # A tiny draft was built from the plugin's own tiny target and ran forward and propose, then
        # decoded speculatively on the tiny target and on a sliding-window variant of it.
        assert line.endswith(
            f"tiny draft for family {families[architecture]!r}: forward and propose ok; "
            "speculative decode ok (full attention; sliding window 4, "
            + ("hybrid)" if architecture == "Qwen3ForCausalLM" else "every layer)")
        ), line
    assert not any(line.startswith("PROBLEM") for line in lines), result.stdout
    assert lines[-1].endswith(", 0 problem(s)")
    assert int(lines[-1].split()[0]) >= 2


def test_list_json_shows_both_architectures_ok() -> None:
    result = dspark("list", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = {row["architecture"]: row for row in payload["architectures"]}
    for architecture in ARCHITECTURES:
        row = rows[architecture]
        assert row["status"] == "ok", row
        assert row["draft_class"] == DRAFT_CLASS
        assert row["distribution"] == "dspark-qwen3" and row["plugin"] == "qwen3"
    assert not [f for f in payload["failures"] if f.get("distribution") == "dspark-qwen3"]
    plugin = next(p for p in payload["plugins"] if p["distribution"] == "dspark-qwen3")
    assert plugin["status"] == "ok"


@pytest.mark.parametrize(("command", "code"), [(("doctor",), 1), (("list", "--json"), 0)])
def test_without_the_plugin_the_architectures_are_absent(command: tuple[str, ...], code: int) -> None:
    """Sanity for the checks above: disabling the plugin removes the two architectures (and doctor,
    left with no family at all, fails)."""
    # The allow list shuts out any other family installed here; the deny list then removes qwen3.
    result = dspark(*command, DSPARK_PLUGINS="qwen3", DSPARK_DISABLE_PLUGINS="qwen3")
    assert result.returncode == code, result.stdout + result.stderr
    assert not any(architecture in result.stdout for architecture in ARCHITECTURES)
