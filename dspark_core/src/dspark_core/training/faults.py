"""Named crash points for fault-injection tests: ``DSPARK_FAULT_KILL_AT=<point>`` SIGKILLs the process there.

The reliability tests kill real training processes at these points (mid-save, mid-prune, mid-export,
mid-metrics-rewrite) and check that resuming gives the uninterrupted run's weights and metrics. Unset,
each point is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "DSPARK_FAULT_KILL_AT"


def point(name: str) -> None:
    """Die here, as a kill -9 would, when the test environment names this point."""
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
