"""Speculative generation with DSpark drafts. Importing this package imports torch."""

from __future__ import annotations

from dspark_core.decoding.speculative import (
    ConfidenceSchedule,
    GenerationResult,
    RoundRecord,
    SpeculativeMetrics,
    check_draft_fits_target,
    combine_metrics,
    plain_generate,
    speculative_generate,
)

__all__ = [
    "ConfidenceSchedule",
    "GenerationResult",
    "RoundRecord",
    "SpeculativeMetrics",
    "check_draft_fits_target",
    "combine_metrics",
    "plain_generate",
    "speculative_generate",
]
