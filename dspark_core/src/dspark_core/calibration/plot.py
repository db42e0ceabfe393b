"""``dspark calibrate --plot``: a reliability diagram per block position, before and after STS."""

from __future__ import annotations

import math
from pathlib import Path

from dspark_core.calibration.metrics import DEFAULT_BINS, reliability_bins, survival_at
from dspark_core.calibration.records import CalibrationRecords
from dspark_core.errors import DSparkError


def plot_reliability(
    records: CalibrationRecords, temperatures: tuple[float, ...], path: Path, bins: int = DEFAULT_BINS
) -> Path:
    """One panel per position: observed survival against the predicted running product, per bin (marker
    area by count), uncalibrated and calibrated. Needs matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DSparkError("--plot needs matplotlib: pip install 'dspark-core[plot]'") from exc
    positions = records.block_size
    columns = min(4, positions)
    rows = math.ceil(positions / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    identity = (1.0,) * positions
    for k in range(rows * columns):
        axis = axes[k // columns][k % columns]
        if k >= positions:
            axis.axis("off")
            continue
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        for temps, label, color in ((identity, "raw", "tab:red"), (temperatures, "STS", "tab:blue")):
            probs, labels = survival_at(records, temps, k)
            points = reliability_bins(probs, labels, bins)
            if points:
                xs, ys, counts = zip(*points, strict=True)
                total = sum(counts)
                sizes = [8 + 300 * c / total for c in counts]
                axis.plot(xs, ys, color=color, linewidth=1, label=label)
                axis.scatter(xs, ys, s=sizes, color=color, alpha=0.6)
        axis.set(
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"position {k} (n={records.samples_at(k)}, T={temperatures[k]:.2f})",
            xlabel="predicted survival",
            ylabel="observed survival",
        )
        axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
