"""``dspark generate --plot``: acceptance per draft position and the accepted-length distribution."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dspark_core.decoding.metrics import SpeculativeMetrics, combine_metrics
from dspark_core.errors import DSparkError


def plot_acceptance(metrics: Sequence[SpeculativeMetrics], path: str | Path) -> Path:
    """Two panels over every round of every prompt: P(accepted > k | proposed > k), and a histogram of
    tokens accepted per round. Needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DSparkError("--plot needs matplotlib: pip install 'dspark-core[plot]'") from exc
    total = combine_metrics(list(metrics))
    rates = total.accept_rates()
    counts = Counter(total.accepted_per_round)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    positions = [k for k, r in enumerate(rates) if r is not None]
    left.bar(positions, [rates[k] for k in positions], color="tab:blue")
    left.set(xlabel="draft position k", ylabel="accept_rate@k", ylim=(0, 1), title="acceptance per position")
    lengths = sorted(counts)
    right.bar(lengths, [counts[n] / max(1, total.rounds) for n in lengths], color="tab:green")
    right.set(
        xlabel="draft tokens accepted in a round",
        ylabel="share of rounds",
        title=f"accepted length (tau_pooled {total.tau_pooled:.2f}, {total.rounds} rounds)",
    )
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
