"""What an evaluation measured, its figures per dataset and overall, the Table-1-style table, the plot.

Torch-free. Every figure is computed by :mod:`dspark_core.decoding.figures`, under its name there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_core.decoding import figures
from dspark_core.decoding.figures import RequestRounds
from dspark_core.errors import DSparkError

__all__ = ["OVERALL", "BatchTiming", "EvalReport", "RequestOutcome", "plot_report"]

#: The column that pools every dataset.
OVERALL = "overall"


@dataclass(frozen=True)
class RequestOutcome:
    """One decoded prompt (one turn of one conversation) by speculative decoding."""

    dataset: str
    source: str
    turn: int
    temperature: float
    rounds: RequestRounds
    prompt_tokens: int
    new_tokens: int
    target_forwards: int
    token_ids: tuple[int, ...]
    #: Whether plain decoding produced the same tokens (``None`` without a baseline).
    identical: bool | None


@dataclass(frozen=True)
class BatchTiming:
    """One batch's wall time and new tokens, by each method (plain ones ``None`` without a baseline)."""

    dataset: str
    temperature: float
    size: int
    spec_tokens: int
    spec_seconds: float
    plain_tokens: int | None
    plain_seconds: float | None

    @property
    def speedup(self) -> float:
        if self.plain_tokens is None or self.plain_seconds is None:
            return float("nan")
        return figures.throughput_ratio(
            self.spec_tokens, self.spec_seconds, self.plain_tokens, self.plain_seconds
        )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class EvalReport:
    settings: dict[str, Any]
    requests: list[RequestOutcome] = field(default_factory=list)
    batches: list[BatchTiming] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.requests))

    @property
    def temperatures(self) -> list[float]:
        return list(dict.fromkeys(r.temperature for r in self.requests))

    @property
    def baseline(self) -> bool:
        return any(b.plain_seconds is not None for b in self.batches)

    def figures(self, temperature: float, dataset: str = OVERALL) -> dict[str, Any]:
        """Every figure of one column: a dataset, or :data:`OVERALL`, at one temperature."""

        def chosen(item: RequestOutcome | BatchTiming) -> bool:
            return item.temperature == temperature and dataset in (OVERALL, item.dataset)

        requests = [r for r in self.requests if chosen(r)]
        batches = [b for b in self.batches if chosen(b)]
        rounds = [r.rounds for r in requests]
        new_tokens = sum(r.new_tokens for r in requests)
        out: dict[str, Any] = {
            "prompts": len(requests),
            "new_tokens": new_tokens,
            "rounds": sum(len(r.committed) for r in rounds),
            "tau_pooled": _finite(figures.tau_pooled(rounds)),
            "tau_mean_per_request": _finite(figures.tau_mean_per_request(rounds)),
            "tokens_per_target_forward": _finite(
                figures.tokens_per_target_forward(new_tokens, sum(r.target_forwards for r in requests))
            ),
            "accept_rate": figures.accept_rates(rounds),
            "mean_proposal_length": _finite(figures.mean_proposal_length(rounds)),
            "seconds": sum(b.spec_seconds for b in batches),
            "tokens_per_s": _finite(
                _per_second(sum(b.spec_tokens for b in batches), [b.spec_seconds for b in batches])
            ),
        }
        timed = [b for b in batches if b.plain_tokens is not None and b.plain_seconds is not None]
        if timed:
            plain_tokens = [b.plain_tokens or 0 for b in timed]
            plain_seconds = [b.plain_seconds or 0.0 for b in timed]
            median, low, high = figures.speedup_median([b.speedup for b in timed])
            compared = [r.identical for r in requests if r.identical is not None]
            out.update(
                plain_seconds=sum(plain_seconds),
                plain_tokens_per_s=_finite(_per_second(sum(plain_tokens), plain_seconds)),
                speedup_pooled=_finite(
                    figures.speedup_pooled(
                        [b.spec_tokens for b in timed],
                        [b.spec_seconds for b in timed],
                        plain_tokens,
                        plain_seconds,
                    )
                ),
                speedup_median=_finite(median),
                speedup_min=_finite(low),
                speedup_max=_finite(high),
                speedup_units=len(timed),
                identical=sum(compared) if temperature == 0 else None,
                compared=len(compared) if temperature == 0 else None,
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON report: settings, definitions, every column's figures, and each request's counts."""
        columns = [*self.datasets, OVERALL]
        return {
            "settings": self.settings,
            "definitions": dict(figures.DEFINITIONS),
            "results": [
                {"temperature": t, "figures": {c: self.figures(t, c) for c in columns}}
                for t in self.temperatures
            ],
            "requests": [
                {
                    "dataset": r.dataset,
                    "source": r.source,
                    "turn": r.turn,
                    "temperature": r.temperature,
                    "prompt_tokens": r.prompt_tokens,
                    "new_tokens": r.new_tokens,
                    "rounds": len(r.rounds.committed),
                    "tau": _finite(figures.tau_pooled([r.rounds])),
                    "identical": r.identical,
                    "token_ids": list(r.token_ids),
                }
                for r in self.requests
            ],
        }

    def table_lines(self) -> list[str]:
        """One Table-1-style block per temperature (datasets as columns, and :data:`OVERALL` when there are
        several), then the definitions in short."""
        columns = self.datasets if len(self.datasets) == 1 else [*self.datasets, OVERALL]
        lines: list[str] = []
        s = self.settings
        for temperature in self.temperatures:
            table = {c: self.figures(temperature, c) for c in columns}
            lines.append(
                f"temperature {temperature:g} · batch size {s['batch_size']} · "
                f"{s['max_new_tokens']} new tokens · {s['turns']} turn{'s' if s['turns'] == 'all' else ''} · "
                f"schedule {s['schedule']}"
            )
            lines.extend(
                _render(_rows(table, columns, self.baseline, temperature == 0), ["figure", *columns])
            )
            lines.append("")
        lines.extend(_FOOTNOTE)
        if self.baseline:
            lines.extend(_SPEEDUP_FOOTNOTE)
        return lines


_FOOTNOTE = [
    "tau: tokens committed per verify round, the bonus token counted (plain decoding is 1.00);",
    "  tau_pooled pools every round (vLLM's convention), tau_mean_per_request averages each request's",
    "  own tau (SpecForge's). accept_rate@k = P(accepted > k | proposed > k). tokens_per_target_forward",
    "  counts the prompt's prefill too.",
]
_SPEEDUP_FOOTNOTE = [
    "speedup_pooled: total speculative tokens/s over total plain tokens/s; speedup_median: the median of",
    "  per-batch ratios (per prompt at batch size 1), min-max beside it. Both methods decoded each batch",
    "  side by side, in alternating order, at the same batch size.",
]


def _per_second(tokens: int, seconds: Sequence[float]) -> float:
    total = sum(seconds)
    return tokens / total if total > 0 else float("nan")


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _rows(
    table: dict[str, dict[str, Any]], columns: list[str], baseline: bool, greedy: bool
) -> list[list[str]]:
    def row(label: str, cell: Any) -> list[str]:
        return [label, *(cell(table[c]) for c in columns)]

    longest = max(len(table[c]["accept_rate"]) for c in columns)
    rows = [
        row("prompts", lambda f: str(f["prompts"])),
        row("new tokens", lambda f: str(f["new_tokens"])),
        row("tau_pooled", lambda f: _fmt(f["tau_pooled"])),
        row("tau_mean_per_request", lambda f: _fmt(f["tau_mean_per_request"])),
        row("tokens_per_target_forward", lambda f: _fmt(f["tokens_per_target_forward"])),
    ]
    for k in range(longest):
        rows.append(
            row(
                f"accept_rate@{k}",
                lambda f, k=k: _fmt(f["accept_rate"][k] if k < len(f["accept_rate"]) else None),
            )
        )
    rows.append(row("mean_proposal_length", lambda f: _fmt(f["mean_proposal_length"])))
    rows.append(row("tokens/s", lambda f: _fmt(f["tokens_per_s"], ".1f")))
    if baseline:
        rows.append(row("tokens/s plain", lambda f: _fmt(f.get("plain_tokens_per_s"), ".1f")))
        rows.append(row("speedup_pooled", lambda f: _fmt(f.get("speedup_pooled"), ".2f", "x")))
        rows.append(row("speedup_median", lambda f: _fmt(f.get("speedup_median"), ".2f", "x")))
        rows.append(
            row(
                "speedup min-max",
                lambda f: f"{_fmt(f.get('speedup_min'))}-{_fmt(f.get('speedup_max'))}x",
            )
        )
        if greedy:
            rows.append(row("identical to plain", lambda f: f"{f.get('identical')}/{f.get('compared')}"))
    return rows


def _render(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]


def plot_report(report: EvalReport, path: str | Path) -> Path:
    """``accept_rate@k`` per dataset, one panel per temperature. Needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DSparkError("--plot needs matplotlib: pip install 'dspark-core[plot]'") from exc
    temperatures = report.temperatures
    figure, axes = plt.subplots(1, len(temperatures), figsize=(5 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures, strict=True):
        for dataset in report.datasets:
            f = report.figures(temperature, dataset)
            positions = [k for k, r in enumerate(f["accept_rate"]) if r is not None]
            label = f"{dataset} (tau_pooled {_fmt(f['tau_pooled'])})"
            ax.plot(positions, [f["accept_rate"][k] for k in positions], marker="o", label=label)
        ax.set(
            xlabel="draft position k",
            ylabel="accept_rate@k = P(accepted > k | proposed > k)",
            ylim=(0, 1),
            title=f"temperature {temperature:g}",
        )
        ax.legend()
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
