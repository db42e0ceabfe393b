"""``dspark plot RUN_DIR``: PNG charts of a run's ``metrics.jsonl``.

Three files are written: ``loss.png`` (the loss and its terms), ``tau.png`` (the objective's tau
proxy and, when the run evaluated, tau measured by speculative decoding) and ``acceptance.png``
(per block position: the objective's mean acceptance proxy alpha_k at the first, middle and last
logged steps, and the decoding loop's share of rounds accepting more than k tokens). matplotlib is an
optional dependency (``pip install 'dspark-core[plot]'``); this module imports neither it nor torch
until asked to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dspark_core.errors import DSparkError
from dspark_core.training.metrics import read_metrics
from dspark_core.validation import is_real

__all__ = ["PlotError", "plot_run"]


class PlotError(DSparkError, RuntimeError):
    """Plotting is impossible: matplotlib is missing, or the run has no metrics."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError(
            "dspark plot needs matplotlib, which is not installed: pip install 'dspark-core[plot]' "
            "(or pip install matplotlib)"
        ) from exc
    # A file-only backend: plotting must work on headless machines.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if is_real(value):
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def _positions(record: dict[str, Any], prefix: str) -> tuple[list[int], list[float]]:
    found = []
    for key, value in record.items():
        if key.startswith(prefix) and key[len(prefix) :].isdigit() and isinstance(value, int | float):
            found.append((int(key[len(prefix) :]), float(value)))
    found.sort()
    return [k for k, _ in found], [v for _, v in found]


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Draw the charts of the run in ``run_dir`` into ``output_dir`` (default ``RUN_DIR/plots``).

    Returns the paths written.
    """
    run = Path(run_dir)
    metrics_file = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics_file.is_file():
        raise PlotError(
            f"no metrics to plot: {metrics_file} does not exist (is {run} a dspark training run?)"
        )
    records = [r for r in read_metrics(metrics_file) if isinstance(r.get("step"), int | float)]
    if not records:
        raise PlotError(f"{metrics_file} holds no logged steps yet")
    plt = _pyplot()
    out = Path(output_dir) if output_dir is not None else (run if run.is_dir() else run.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [
        _loss_chart(plt, records, out / "loss.png"),
        _tau_chart(plt, records, out / "tau.png"),
        _acceptance_chart(plt, records, out / "acceptance.png"),
    ]


def _loss_chart(plt: Any, records: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "l1", "confidence_loss"):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=key, linewidth=2 if key == "loss" else 1)
    return _finish(plt, fig, ax, path, ylabel="loss", title="training loss")


def _tau_chart(plt: Any, records: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    # Runs written before the rename log the proxy as "tau" and the per-slot proxy as "accept_rate@k".
    proxy = "tau_proxy" if any("tau_proxy" in r for r in records) else "tau"
    # ... and decoding's tau as "eval_tau" before it was named eval_tau_pooled.
    measured = "eval_tau_pooled" if any("eval_tau_pooled" in r for r in records) else "eval_tau"
    for key, label in (
        (proxy, "tau_proxy (teacher-forced, training rows)"),
        (measured, "tau_pooled (decoding)"),
    ):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=label, marker="o" if key == measured else None)
    return _finish(plt, fig, ax, path, ylabel="tokens per verify round", title="tau")


def _acceptance_chart(plt: Any, records: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    slot_prefix = "alpha@" if any(_positions(r, "alpha@")[0] for r in records) else "accept_rate@"
    with_rates = [r for r in records if _positions(r, slot_prefix)[0]]
    picks = sorted({0, len(with_rates) // 2, len(with_rates) - 1}) if with_rates else []
    for index in picks:
        record = with_rates[index]
        positions, rates = _positions(record, slot_prefix)
        ax.plot(positions, rates, marker="o", label=f"alpha@k (teacher-forced), step {int(record['step'])}")
    evaluated = [r for r in records if _positions(r, "eval_accept_rate@")[0]]
    if evaluated:
        positions, rates = _positions(evaluated[-1], "eval_accept_rate@")
        label = f"decoding, P(more than k accepted), step {int(evaluated[-1]['step'])}"
        ax.plot(positions, rates, marker="s", linestyle="--", label=label)
    ax.set_ylim(0, 1.05)
    return _finish(
        plt, fig, ax, path, xlabel="block position k", ylabel="acceptance", title="acceptance per position",
        legend=bool(picks or evaluated),
    )  # fmt: skip


def _finish(
    plt: Any,
    fig: Any,
    ax: Any,
    path: Path,
    *,
    ylabel: str,
    title: str,
    xlabel: str = "step",
    legend: bool = True,
) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
