"""The plugin commands of the `dspark` CLI, run as a user would: a subprocess per call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import spec_plugin_source, write_distribution


@pytest.fixture
def cli_site(tmp_path):
    site = tmp_path / "site"
    write_distribution(
        site,
        "fam-cli",
        "2.0",
        entry_points={"cli": "fam_cli"},
        modules={
            "fam_cli": spec_plugin_source({"CliForLM": "fam_cli_model:Draft"}),
            "fam_cli_model": "class Draft:\n    pass\n",
        },
    )
    write_distribution(
        site,
        "fam-clibroken",
        "0.1",
        entry_points={"clibroken": "fam_clibroken"},
        modules={"fam_clibroken": "raise ImportError('needs a missing dependency')\n"},
    )

    def dspark(*args, **env_extra):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), **env_extra}
        return subprocess.run(
            [sys.executable, "-m", "dspark_core.cli", *args], env=env, capture_output=True, text=True
        )

    return dspark


def test_list_json(cli_site):
    result = cli_site("list", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = {row["architecture"]: row for row in payload["architectures"] if row["architecture"]}
    assert rows["CliForLM"]["draft_class"] == "fam_cli_model:Draft"
    assert rows["CliForLM"]["distribution"] == "fam-cli" and rows["CliForLM"]["version"] == "2.0"
    assert rows["CliForLM"]["status"] == "ok"
    failures = [f for f in payload["failures"] if f["distribution"] == "fam-clibroken"]
    assert failures and failures[0]["stage"] == "import" and "missing dependency" in failures[0]["error"]


def test_list_table_shows_failures(cli_site):
    result = cli_site("list")
    assert result.returncode == 0
    assert "CliForLM" in result.stdout and "fam_cli_model:Draft" in result.stdout
    assert "Failed plugins" in result.stdout and "fam-clibroken" in result.stdout
    blocked = cli_site("list", DSPARK_DISABLE_PLUGINS="clibroken")
    assert "blocked" in blocked.stdout and "Failed plugins" not in blocked.stdout


def test_resolve_exit_codes(cli_site, tmp_path):
    ok = cli_site("resolve", "NopeForLM", "CliForLM", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["architecture"] == "CliForLM"
    missing = cli_site("resolve", "NopeForLM")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "NopeForLM" in missing.stderr and "pip install dspark-nope" in missing.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["CliForLM"]}))
    assert cli_site("resolve", "--config", str(config)).returncode == 0
    config.write_text("{not json")
    bad = cli_site("resolve", "--config", str(config))
    assert bad.returncode == 1 and "not valid JSON" in bad.stderr
    verbose = cli_site("resolve", "NopeForLM", "--verbose")
    assert "Traceback" in verbose.stderr


def test_doctor_reports_each_problem(cli_site):
    result = cli_site("doctor")
    assert result.returncode == 1
    assert "fam-clibroken" in result.stdout
    assert "CliForLM" in result.stdout and "not a transformers.PreTrainedModel subclass" in result.stdout
