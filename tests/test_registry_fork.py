"""A child forked while another thread is discovering plugins can still use the registry."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from conftest import spec_plugin_source

from dspark_core import DSPARK_DRAFT_REGISTRY, resolve_dspark_draft_spec

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

DEADLINE_S = 30.0


def test_fork_during_discovery_does_not_deadlock_the_child(plugin_site) -> None:
    started = threading.Event()
    release = threading.Event()
    # A real installed plugin whose import blocks until told to go on: discovery holds the
    # registry's lock meanwhile.
    plugin_site(
        "fam-slow",
        entry_points={"slow": "fam_slow"},
        modules={
            "fam_slow": "import fam_slow_gate\nfam_slow_gate.started.set()\nfam_slow_gate.release.wait(60)\n"
            + spec_plugin_source({"SlowForCausalLM": "fam_slow_model:Draft"}),
            "fam_slow_gate": "",
        },
    )
    import fam_slow_gate  # type: ignore[import-not-found]

    fam_slow_gate.started, fam_slow_gate.release = started, release
    DSPARK_DRAFT_REGISTRY.refresh()
    discovering = threading.Thread(target=DSPARK_DRAFT_REGISTRY.report)
    discovering.start()
    try:
        assert started.wait(30), "the slow plugin was never imported"
        pid = os.fork()
        if pid == 0:  # the child: skip the plugin whose import the dead thread was running
            code = 1
            try:
                os.environ["DSPARK_DISABLE_PLUGINS"] = "slow"
                code = 0 if resolve_dspark_draft_spec(["Qwen3ForCausalLM"]) is not None else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + DEADLINE_S
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child was still blocked after {DEADLINE_S:.0f} s")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        release.set()
        discovering.join(30)
        sys.modules.pop("fam_slow_gate", None)
