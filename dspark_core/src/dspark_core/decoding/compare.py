"""Speculative against plain decoding on a prompt set, one prompt at a time, measured side by side.

Each prompt is decoded by both methods back to back, in alternating order, so machine load falls on
both alike. Figures are :mod:`~dspark_core.decoding.figures`': ``tau_pooled``, ``accept_rate@k``,
``speedup_pooled`` and ``speedup_median`` (over per-prompt ratios, with min and max). Greedy runs
also count how many outputs are identical. ``dspark eval`` (:mod:`dspark_core.evaluation`) is the
batched, multi-dataset form of this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dspark_core.decoding import figures


@dataclass
class Comparison:
    """The figures of one prompt set."""

    prompts: int
    tau_pooled: float
    tau_mean_per_request: float
    accept_rates: list[float | None]
    speedups: list[float] = field(default_factory=list)
    speedup_pooled: float = float("nan")
    identical: int = 0
    greedy: bool = True
    speculative_tokens_per_s: float = 0.0
    plain_tokens_per_s: float = 0.0

    @property
    def speedup_median(self) -> float:
        return figures.speedup_median(self.speedups)[0]

    def summary_lines(self) -> list[str]:
        """Human-readable lines: tau, accept rates, both speedups, identical outputs."""
        rates = " ".join("-" if r is None else f"{r:.2f}" for r in self.accept_rates)
        median, low, high = figures.speedup_median(self.speedups)
        lines = [
            f"tau_pooled {self.tau_pooled:.2f}, tau_mean_per_request {self.tau_mean_per_request:.2f} "
            "(tokens per verify round, the bonus token counted; plain decoding is 1.00)",
            f"accept_rate@k, k=0..: {rates}",
            f"speedup_pooled {self.speedup_pooled:.2f}x ({self.speculative_tokens_per_s:.0f} vs "
            f"{self.plain_tokens_per_s:.0f} tokens/s); speedup_median {median:.2f}x over {self.prompts} "
            f"prompts (min {low:.2f}x, max {high:.2f}x)",
        ]
        if self.greedy:
            lines.append(f"outputs identical to plain greedy decoding: {self.identical}/{self.prompts}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "tau_pooled": self.tau_pooled,
            "tau_mean_per_request": self.tau_mean_per_request,
            "accept_rate": self.accept_rates,
            "speedup_pooled": self.speedup_pooled,
            "speedup_median": self.speedup_median,
            "speedup_min": figures.speedup_median(self.speedups)[1],
            "speedup_max": figures.speedup_median(self.speedups)[2],
            "identical": self.identical if self.greedy else None,
            "speculative_tokens_per_s": self.speculative_tokens_per_s,
            "plain_tokens_per_s": self.plain_tokens_per_s,
        }


def compare_on_prompts(
    target: nn.Module,
    draft: nn.Module,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    on_prompt: Callable[[int], object] | None = None,
) -> Comparison:
    """Decode every prompt (``[1, P]`` ids) with both methods, interleaved; see the module docstring."""
    from dspark_core.decoding import combine_metrics, plain_generate, speculative_generate

    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "eos_token_id": eos_token_id,
    }
    speculative, plain, ratios, identical = [], [], [], 0
    for index, prompt in enumerate(prompts):
        runs: dict[str, Any] = {}
        order = ("plain", "speculative") if index % 2 == 0 else ("speculative", "plain")
        for method in order:
            if method == "plain":
                runs[method] = plain_generate(target, prompt, seed=seed + index, **options)
            else:
                runs[method] = speculative_generate(target, draft, prompt, seed=seed + index, **options)
        spec, base = runs["speculative"].metrics, runs["plain"].metrics
        speculative.append(spec)
        plain.append(base)
        ratios.append(
            figures.throughput_ratio(spec.new_tokens, spec.total_time_s, base.new_tokens, base.total_time_s)
        )
        identical += runs["speculative"].new_tokens == runs["plain"].new_tokens
        if on_prompt is not None:
            on_prompt(index + 1)
    spec_all, plain_all = combine_metrics(speculative), combine_metrics(plain)
    requests = [m.request_rounds() for m in speculative]
    return Comparison(
        prompts=len(prompts),
        tau_pooled=figures.tau_pooled(requests),
        tau_mean_per_request=figures.tau_mean_per_request(requests),
        accept_rates=figures.accept_rates(requests),
        speedups=ratios,
        speedup_pooled=figures.throughput_ratio(
            spec_all.new_tokens, spec_all.total_time_s, plain_all.new_tokens, plain_all.total_time_s
        ),
        identical=identical,
        greedy=temperature == 0,
        speculative_tokens_per_s=spec_all.tokens_per_s,
        plain_tokens_per_s=plain_all.tokens_per_s,
    )
