"""Speculative generation with DSpark drafts.

| module | job |
|---|---|
| ``batched`` | the loops over a batch of prompts: ``speculative_generate_batch``, ``plain_generate_batch`` |
| ``speculative`` | ``speculative_generate`` and ``plain_generate``: a batch of one |
| ``schedule`` | confidence schedules, one registered class each (torch-free) |
| ``metrics`` | per-round records, per-generation metrics, their combination |
| ``target`` | the target behind its ragged cache: batched feeds, per-row cut-back |
| ``ragged_cache`` | the target KV cache with one length per row, its masks (full and sliding layers) |
| ``verify`` | greedy and rejection verification |
| ``fit`` | ``check_draft_fits_target``, the entry to the draft's own ``check_fits_target`` |
| ``compare`` / ``plot`` | speculative against plain on a prompt set; ``generate --plot`` |

Importing this package imports torch only when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspark_core.decoding.batched import plain_generate_batch, speculative_generate_batch
    from dspark_core.decoding.fit import check_draft_fits_target
    from dspark_core.decoding.metrics import (
        GenerationResult,
        RoundRecord,
        SpeculativeMetrics,
        combine_metrics,
    )
    from dspark_core.decoding.schedule import ConfidenceSchedule, register_schedule, schedule_names
    from dspark_core.decoding.speculative import plain_generate, speculative_generate

_HOMES = {
    "ConfidenceSchedule": "schedule",
    "register_schedule": "schedule",
    "schedule_names": "schedule",
    "GenerationResult": "metrics",
    "RoundRecord": "metrics",
    "SpeculativeMetrics": "metrics",
    "combine_metrics": "metrics",
    "check_draft_fits_target": "fit",
    "plain_generate": "speculative",
    "plain_generate_batch": "batched",
    "speculative_generate_batch": "batched",
    "speculative_generate": "speculative",
}

__all__ = [
    "ConfidenceSchedule",
    "GenerationResult",
    "RoundRecord",
    "SpeculativeMetrics",
    "check_draft_fits_target",
    "combine_metrics",
    "plain_generate",
    "plain_generate_batch",
    "register_schedule",
    "schedule_names",
    "speculative_generate",
    "speculative_generate_batch",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'dspark_core.decoding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dspark_core.decoding.{home}"), name)
    globals()[name] = value
    return value
