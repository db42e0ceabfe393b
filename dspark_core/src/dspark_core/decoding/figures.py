"""The one vocabulary of figures: every command that reports tau, acceptance or speedup uses these
names and these definitions.

Torch-free. A *verify round* is one target forward that checks a proposal (the prompt's prefill is
not a round); it commits the accepted draft tokens plus one token from the target (the bonus token
when all were accepted, the correction otherwise). Both tau figures count that token, as the DSpark
paper does, so plain decoding has tau 1.00.

Engines and training libraries disagree on "acceptance length": vLLM pools committed tokens over
all verify rounds of a run (``tau_pooled``); SpecForge averages each request's own mean
(``tau_mean_per_request``). They differ when requests of different lengths accept differently.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFINITIONS",
    "RequestRounds",
    "accept_rates",
    "definition_lines",
    "mean_proposal_length",
    "speedup_median",
    "speedup_pooled",
    "tau_mean_per_request",
    "tau_pooled",
    "throughput_ratio",
    "tokens_per_target_forward",
]

#: Name -> definition, as printed under tables and written into JSON reports.
DEFINITIONS: dict[str, str] = {
    "tau_pooled": "tokens committed per verify round, pooled over every round of every request "
    "(vLLM's convention); the bonus/correction token is counted, so plain decoding is 1.00",
    "tau_mean_per_request": "the mean over requests of each request's tokens committed per verify round "
    "(SpecForge's convention); the bonus/correction token is counted",
    "tokens_per_target_forward": "new tokens over all target forwards, the prompt's prefill included",
    "tau_proxy": "teacher-forced training figure on training blocks: 1 + sum_k prod_{j<=k} alpha@j, "
    "alpha@k being 1 - the total variation between draft and target at slot k; a proxy, not decoding",
    "accept_rate@k": "P(accepted > k | proposed > k): rounds that accepted more than k draft tokens over "
    "rounds that proposed more than k, pooled over rounds",
    "mean_proposal_length": "draft tokens sent to verification per round, after the confidence schedule",
    "speedup_pooled": "speculative tokens/s over plain tokens/s, each pooled over the whole run "
    "(total new tokens over total wall time), both measured side by side in alternating order",
    "speedup_median": "the median of per-unit ratios of speculative to plain tokens/s, a unit being one "
    "prompt at batch size 1 and one batch otherwise; min and max are given with it",
}


@dataclass(frozen=True)
class RequestRounds:
    """One request's rounds: tokens committed, draft tokens accepted and proposed, per verify round."""

    committed: Sequence[int]
    accepted: Sequence[int]
    proposed: Sequence[int]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def tau_pooled(requests: Sequence[RequestRounds]) -> float:
    """Sum of committed tokens over the number of verify rounds, across all requests."""
    return _ratio(sum(sum(r.committed) for r in requests), sum(len(r.committed) for r in requests))


def tau_mean_per_request(requests: Sequence[RequestRounds]) -> float:
    """Each request's committed tokens per round, averaged over the requests that had a round."""
    per_request = [sum(r.committed) / len(r.committed) for r in requests if r.committed]
    return statistics.fmean(per_request) if per_request else float("nan")


def tokens_per_target_forward(new_tokens: int, target_forwards: int) -> float:
    return _ratio(new_tokens, target_forwards)


def accept_rates(requests: Sequence[RequestRounds]) -> list[float | None]:
    """``accept_rate@k`` for ``k = 0 .. longest proposal - 1`` (``None`` where no round proposed > k)."""
    proposed = [p for r in requests for p in r.proposed]
    accepted = [a for r in requests for a in r.accepted]
    rates: list[float | None] = []
    for k in range(max(proposed, default=0)):
        eligible = sum(1 for p in proposed if p > k)
        passed = sum(1 for a in accepted if a > k)
        rates.append(passed / eligible if eligible else None)
    return rates


def mean_proposal_length(requests: Sequence[RequestRounds]) -> float:
    return _ratio(sum(sum(r.proposed) for r in requests), sum(len(r.proposed) for r in requests))


def throughput_ratio(spec_tokens: int, spec_seconds: float, plain_tokens: int, plain_seconds: float) -> float:
    """Speculative tokens/s over plain tokens/s (NaN when either measured nothing)."""
    if spec_seconds <= 0 or plain_seconds <= 0 or plain_tokens == 0:
        return float("nan")
    return (spec_tokens / spec_seconds) / (plain_tokens / plain_seconds)


def speedup_pooled(
    spec_tokens: Sequence[int],
    spec_seconds: Sequence[float],
    plain_tokens: Sequence[int],
    plain_seconds: Sequence[float],
) -> float:
    """:func:`throughput_ratio` of the totals."""
    return throughput_ratio(sum(spec_tokens), sum(spec_seconds), sum(plain_tokens), sum(plain_seconds))


def speedup_median(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-unit speedups, NaNs left out; all NaN when none is finite."""
    finite = [r for r in ratios if math.isfinite(r)]
    if not finite:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(finite), min(finite), max(finite)


def definition_lines(names: Sequence[str]) -> list[str]:
    """``name: definition`` for each name, for the foot of a table."""
    return [f"{name}: {DEFINITIONS[name]}" for name in names]
