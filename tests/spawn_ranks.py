"""Run a function on several local ranks (real processes) and collect what each rank saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.spawn import spawn


def spawn_ranks(
    worker: Callable[..., None], world_size: int, tmp_path: Path, *, timeout_s: float
) -> list[dict[str, Any]]:
    """Call ``worker(rank, store_path, out_dir)`` on ``world_size`` processes.

    Each rank must ``torch.save`` its results to ``out_dir/rank{rank}.pt``. Workers still running
    after ``timeout_s`` are killed and the test fails, so a hung collective cannot hang the suite.
    """
    # torch does not type spawn; with join=False it returns the ProcessContext.
    context = spawn(  # type: ignore[no-untyped-call]
        worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=False
    )
    assert context is not None
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed workers did not finish within {timeout_s} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
