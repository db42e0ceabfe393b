"""Speculative against plain decoding on a prompt set, measured side by side.

Each prompt is decoded by both methods back to back, in alternating order, so machine load falls on
both alike; the speedup is the median of per-prompt time ratios, with its min and max. Greedy runs
also count how many outputs are identical.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class Comparison:
    """The figures of one prompt set."""

    prompts: int
    tau: float
    accept_rates: list[float | None]
    speedups: list[float] = field(default_factory=list)
    identical: int = 0
    greedy: bool = True
    speculative_tokens_per_s: float = 0.0
    plain_tokens_per_s: float = 0.0

    @property
    def speedup_median(self) -> float:
        return statistics.median(self.speedups)

    def summary_lines(self) -> list[str]:
        """Human-readable lines: tau, accept rates, speedup (median, min-max), identical outputs."""
        rates = " ".join("-" if r is None else f"{r:.2f}" for r in self.accept_rates)
        lines = [
            f"tau {self.tau:.2f} (tokens committed per target forward; plain decoding is 1.00)",
            f"accept_rate@k, k=0..: {rates}",
            f"speedup over plain decoding: {self.speedup_median:.2f}x (median of {self.prompts} prompts, "
            f"min {min(self.speedups):.2f}x, max {max(self.speedups):.2f}x; "
            f"{self.speculative_tokens_per_s:.0f} vs {self.plain_tokens_per_s:.0f} tokens/s)",
        ]
        if self.greedy:
            lines.append(f"outputs identical to plain greedy decoding: {self.identical}/{self.prompts}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "tau": self.tau,
            "accept_rate": self.accept_rates,
            "speedup_median": self.speedup_median,
            "speedup_min": min(self.speedups),
            "speedup_max": max(self.speedups),
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
        ratios.append(spec.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan"))
        identical += runs["speculative"].new_tokens == runs["plain"].new_tokens
        if on_prompt is not None:
            on_prompt(index + 1)
    spec_all, plain_all = combine_metrics(speculative), combine_metrics(plain)
    return Comparison(
        prompts=len(prompts),
        tau=spec_all.tau,
        accept_rates=spec_all.accept_rates(),
        speedups=ratios,
        identical=identical,
        greedy=temperature == 0,
        speculative_tokens_per_s=spec_all.tokens_per_s,
        plain_tokens_per_s=plain_all.tokens_per_s,
    )
