"""Listing and resolving plugins must not import torch, transformers or model code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import spec_plugin_source, write_distribution

PROBE = """
import json, sys
import dspark_core
after_import = sorted(m for m in ("torch", "transformers") if m in sys.modules)
names = sorted(dspark_core.DSPARK_DRAFT_REGISTRY)
spec = dspark_core.resolve_dspark_draft_spec(["ProbeForLM"])
"ProbeForLM" in dspark_core.DSPARK_DRAFT_REGISTRY
after_resolve = sorted(m for m in ("torch", "transformers", "fam_probe_model") if m in sys.modules)
spec.draft_cls
after_access = "fam_probe_model" in sys.modules
print(json.dumps({"after_import": after_import, "after_resolve": after_resolve,
                  "after_access": after_access, "names": names}))
"""


def test_listing_and_resolving_import_no_torch(tmp_path):
    write_distribution(
        tmp_path,
        "fam-probe",
        entry_points={"probe": "fam_probe"},
        modules={
            "fam_probe": spec_plugin_source({"ProbeForLM": "fam_probe_model:Draft"}),
            # The model module imports torch, as a real family's does.
            "fam_probe_model": "import torch\nclass Draft:\n    pass\n",
        },
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["after_import"] == []
    assert result["after_resolve"] == []
    assert result["after_access"] is True
    assert "ProbeForLM" in result["names"]


def test_import_does_no_discovery(tmp_path):
    # A plugin whose import would fail loudly: importing dspark_core must not touch it.
    write_distribution(
        tmp_path, "fam-loud", entry_points={"loud": "fam_loud"}, modules={"fam_loud": "raise SystemExit(7)\n"}
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    code = "import dspark_core, sys; print('fam_loud' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_list_resolve_and_help_import_no_torch(tmp_path):
    write_distribution(
        tmp_path,
        "fam-probe",
        entry_points={"probe": "fam_probe"},
        modules={"fam_probe": spec_plugin_source({"ProbeForLM": "fam_probe_model:Draft"})},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    code = (
        "import contextlib, io, sys\n"
        "from dspark_core.cli import build_parser, main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['list', '--json']) == 0\n"
        "    assert main(['resolve', 'ProbeForLM']) == 0\n"
        "    build_parser()  # every subcommand's parser, as `dspark --help` builds it\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
