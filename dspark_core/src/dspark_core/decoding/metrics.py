"""What a decode reports: per-round records, per-generation metrics and their combination."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

StopReason = Literal["eos", "max_new_tokens"]


@dataclass(frozen=True)
class RoundRecord:
    """What one verify round did; passed to ``on_round`` right after the round is committed.

    Attributes:
        index: 0-based round number.
        anchor_position: ``s``, the position of the anchor ``x_s`` fed first to the target.
        drafted: slots the draft produced (0 when the budget left no room and the draft was not called).
        proposed: ``l``, the tokens sent to verification after the schedule.
        accepted: ``a``, the leading proposed tokens the target accepted.
        committed: the tokens appended to the output this round (``a + 1``, fewer when EOS stopped it).
        target_tokens_fed: tokens fed to the target's verify forward (``l + 1``).
        target_cache_length: the target cache's length after the crop (``s + a + 1``).
        draft_cache_length: the draft cache's length after the proposal (``s`` when it drafted).
        draft_context_rows: context rows fed to the draft this round.
        confidence_logits: the raw confidence logits of the drafted slots, before any schedule cut
            (empty when the draft has no confidence head or did not draft).
    """

    index: int
    anchor_position: int
    drafted: int
    proposed: int
    accepted: int
    committed: tuple[int, ...]
    target_tokens_fed: int
    target_cache_length: int
    draft_cache_length: int
    draft_context_rows: int
    confidence_logits: tuple[float, ...] = ()


@dataclass(frozen=True)
class SpeculativeMetrics:
    """Counts and timings of one generation (or, through :func:`combine_metrics`, of several).

    Plain decoding reports through the same type: each decode step is a round that proposed nothing.
    """

    prompt_tokens: int
    new_tokens: int
    committed_per_round: tuple[int, ...]
    accepted_per_round: tuple[int, ...]
    proposed_per_round: tuple[int, ...]
    draft_time_s: float
    target_time_s: float
    total_time_s: float
    target_forwards: int
    draft_forwards: int
    stop_reason: StopReason
    generations: int = 1

    @property
    def rounds(self) -> int:
        """Verify rounds (target forwards after the prefill)."""
        return len(self.committed_per_round)

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify round, the bonus (or corrected) token included."""
        return sum(self.committed_per_round) / self.rounds if self.rounds else float("nan")

    @property
    def mean_proposal_length(self) -> float:
        """Mean ``l`` over rounds: the tokens sent to verification after the schedule."""
        return sum(self.proposed_per_round) / self.rounds if self.rounds else float("nan")

    @property
    def mean_accepted(self) -> float:
        """Mean ``a`` over rounds."""
        return sum(self.accepted_per_round) / self.rounds if self.rounds else float("nan")

    def accept_rates(self) -> list[float | None]:
        """``accept_rate@i`` for ``i = 0 .. max l - 1``: rounds with more than ``i`` accepted over rounds
        that proposed more than ``i`` (``None`` when no round proposed more than ``i``)."""
        longest = max(self.proposed_per_round, default=0)
        rates: list[float | None] = []
        for i in range(longest):
            eligible = sum(1 for p in self.proposed_per_round if p > i)
            passed = sum(1 for a in self.accepted_per_round if a > i)
            rates.append(passed / eligible if eligible else None)
        return rates

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole wall time (prefill included)."""
        return self.new_tokens / self.total_time_s if self.total_time_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (derived figures included, per-round lists left out)."""
        return {
            "generations": self.generations,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "tau": _finite_or_none(self.tau),
            "accept_rate": self.accept_rates(),
            "mean_proposal_length": _finite_or_none(self.mean_proposal_length),
            "mean_accepted": _finite_or_none(self.mean_accepted),
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": _finite_or_none(self.tokens_per_s),
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "stop_reason": self.stop_reason,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def combine_metrics(metrics: Sequence[SpeculativeMetrics]) -> SpeculativeMetrics:
    """Pool several generations' metrics: rounds are concatenated, counts and times summed.

    ``stop_reason`` is ``eos`` only if every generation stopped at EOS.
    """
    if not metrics:
        raise ValueError("combine_metrics needs at least one SpeculativeMetrics")
    return SpeculativeMetrics(
        prompt_tokens=sum(m.prompt_tokens for m in metrics),
        new_tokens=sum(m.new_tokens for m in metrics),
        committed_per_round=tuple(c for m in metrics for c in m.committed_per_round),
        accepted_per_round=tuple(a for m in metrics for a in m.accepted_per_round),
        proposed_per_round=tuple(p for m in metrics for p in m.proposed_per_round),
        draft_time_s=sum(m.draft_time_s for m in metrics),
        target_time_s=sum(m.target_time_s for m in metrics),
        total_time_s=sum(m.total_time_s for m in metrics),
        target_forwards=sum(m.target_forwards for m in metrics),
        draft_forwards=sum(m.draft_forwards for m in metrics),
        stop_reason="eos" if all(m.stop_reason == "eos" for m in metrics) else "max_new_tokens",
        generations=sum(m.generations for m in metrics),
    )


@dataclass(frozen=True)
class GenerationResult:
    """``sequences`` is ``[1, P + new]``: the prompt followed by the generated tokens."""

    sequences: Tensor
    metrics: SpeculativeMetrics
    rounds: tuple[RoundRecord, ...] = field(default=(), repr=False)

    @property
    def new_tokens(self) -> list[int]:
        """The generated token ids."""
        return [int(t) for t in self.sequences[0, self.metrics.prompt_tokens :].tolist()]
