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
        return run_cli(site, *args, **env_extra)

    dspark.site = site
    return dspark


SELECTION_VARIABLES = (
    "DSPARK_DISABLE_PLUGINS",
    "DSPARK_PLUGINS",
    "DSPARK_DISABLE_PLUGIN_AUTOLOAD",
    "DSPARK_STRICT_PLUGINS",
)


def run_cli(site, *args, **env_extra):
    """``python -m dspark_core.cli ARGS`` with ``site`` first on the path and no inherited selection."""
    env = {k: v for k, v in os.environ.items() if k not in SELECTION_VARIABLES}
    env.update({"PYTHONPATH": os.pathsep.join([str(site), *sys.path]), **env_extra})
    return subprocess.run(
        [sys.executable, "-m", "dspark_core.cli", *args], env=env, capture_output=True, text=True
    )


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


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("command", [("list",), ("list", "--json"), ("resolve", "CliForLM")])
def test_selection_warnings_are_one_stderr_line_each(cli_site, command):
    result = cli_site(
        *command, DSPARK_DISABLE_PLUGINS="fam-nonexistent,clibroken", DSPARK_PLUGINS="cli,clibroken,nope2"
    )
    assert result.returncode == 0, result.stderr
    lines = warning_lines(result.stderr)
    assert len(lines) == 2, result.stderr
    assert all(line.startswith("warning: DSparkPluginWarning: DSPARK_") for line in lines)
    assert any("'fam-nonexistent'" in line and "DSPARK_DISABLE_PLUGINS" in line for line in lines)
    assert any("'nope2'" in line and "DSPARK_PLUGINS" in line for line in lines)
    assert len(result.stderr.splitlines()) == 2, result.stderr


def test_strict_list_still_shows_every_failure_and_exits_1(cli_site):
    write_distribution(
        cli_site.site,
        "fam-clibroken2",
        entry_points={"clibroken2": "fam_clibroken2"},
        modules={"fam_clibroken2": "raise RuntimeError('second\\nfailure')\n"},
    )
    result = cli_site("list", DSPARK_STRICT_PLUGINS="1")
    assert result.returncode == 1
    assert "CliForLM" in result.stdout and "Failed plugins" in result.stdout
    assert "fam-clibroken " in result.stdout and "fam-clibroken2" in result.stdout
    errors = result.stderr.splitlines()
    assert errors[0].startswith("dspark list: error: 2 dspark plugin(s) failed"), result.stderr
    assert len([line for line in errors if "fam-clibroken " in line]) == 1
    assert len([line for line in errors if "fam-clibroken2" in line and "second failure" in line]) == 1
    as_json = cli_site("list", "--json", DSPARK_STRICT_PLUGINS="1")
    assert as_json.returncode == 1 and len(json.loads(as_json.stdout)["failures"]) == 2
    resolve = cli_site("resolve", "CliForLM", DSPARK_STRICT_PLUGINS="1")
    assert resolve.returncode == 1 and "Traceback" not in resolve.stderr
    assert [line for line in resolve.stderr.splitlines() if "fam-clibroken2" in line], resolve.stderr


def test_plugin_and_registry_warnings_reach_the_user_as_one_line_each(cli_site):
    warns = "import warnings\nwarnings.warn('this plugin is old;\\n  upgrade it')\n"
    write_distribution(
        cli_site.site,
        "fam-cliwarns",
        entry_points={"cliwarns": "fam_cliwarns"},
        modules={"fam_cliwarns": warns + spec_plugin_source({"WarnsForLM": "fam_cliwarns:D"})},
    )
    # make-tiny-target looks plugins up without the list commands' own reporting: warnings.warn path.
    result = cli_site("make-tiny-target", "--list-families")
    lines = result.stderr.splitlines()
    assert "warning: UserWarning: this plugin is old; upgrade it" in lines, result.stderr
    skipped = [line for line in lines if "fam-clibroken" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: DSparkPluginWarning: skipping dspark plugin")
    assert all(line.startswith("warning: ") for line in lines), result.stderr
    verbose = cli_site("make-tiny-target", "--list-families", "--verbose")
    assert any(
        line.endswith(".py:2)") and "this plugin is old" in line for line in verbose.stderr.splitlines()
    )


def test_doctor_fails_when_no_family_is_registered(tmp_path):
    site = tmp_path / "site"
    # A plugin whose entry-point group is misspelt: installed, but never found.
    dist_info = write_distribution(
        site, "fam-misspelt", modules={"fam_misspelt": spec_plugin_source({"MisForLM": "fam_misspelt:D"})}
    )
    (dist_info / "entry_points.txt").write_text("[dspark.draft]\nmisspelt = fam_misspelt\n")
    # Every installed family is disabled (dspark-gemma4 too, where the test run installs it).
    result = run_cli(site, "doctor", DSPARK_DISABLE_PLUGINS="qwen3,dspark-gemma4")
    assert result.returncode == 1, result.stdout
    (problem,) = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert "no dspark family is registered" in problem and "'dspark.drafts'" in problem
    assert "blocked by selection: plugin 'qwen3'" in problem
    assert result.stdout.splitlines()[-1] == "0 draft class(es) ok, 1 problem(s)"


def test_doctor_reports_a_draft_class_without_config_class(tmp_path):
    site = tmp_path / "site"
    model = "from transformers import PreTrainedModel\n\nclass Draft(PreTrainedModel):\n    pass\n"
    write_distribution(
        site,
        "fam-nocfg",
        entry_points={"nocfg": "fam_nocfg"},
        modules={
            "fam_nocfg": spec_plugin_source({"NoCfgForLM": "fam_nocfg_model:Draft"}),
            "fam_nocfg_model": model,
        },
    )
    result = run_cli(site, "doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1, result.stdout
    assert (
        "NoCfgForLM: draft class fam_nocfg_model.Draft" in problems[0]
        and "has no config_class" in problems[0]
    )
    assert any(line.startswith("ok       Qwen3ForCausalLM") for line in result.stdout.splitlines())


BAD_PROPOSE_MODEL = """
from dspark_qwen3.modeling import Qwen3DSparkModel
from dspark_qwen3.testing import build_tiny_qwen3

class Draft(Qwen3DSparkModel):
    def propose(self, *args, **kwargs):
        proposal = super().propose(*args, **kwargs)
        proposal.tokens = proposal.tokens[:, :-1]  # drops a slot
        return proposal

def build_target(shape):
    target = build_tiny_qwen3(shape)
    target.config.architectures = ["BadProposeForLM"]
    return target
"""

BAD_PROPOSE_PLUGIN = """
from dspark_core import DSparkDraftSpec, hookimpl

@hookimpl
def dspark_draft_specs():
    return {"BadProposeForLM": DSparkDraftSpec("fam_badprop_model:Draft")}

@hookimpl
def dspark_tiny_target_builders():
    return {"badprop": "fam_badprop_model:build_target"}
"""


def test_doctor_runs_the_tiny_draft_of_a_plugins_tiny_target(tmp_path):
    site = tmp_path / "site"
    write_distribution(
        site,
        "fam-badprop",
        entry_points={"badprop": "fam_badprop"},
        modules={"fam_badprop": BAD_PROPOSE_PLUGIN, "fam_badprop_model": BAD_PROPOSE_MODEL},
    )
    result = run_cli(site, "doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    (problem,) = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert problem.startswith("PROBLEM  BadProposeForLM: the tiny draft's forward and propose")
    assert "propose returned tokens of shape (1, 3)" in problem and "expected shape (1, 4)" in problem
