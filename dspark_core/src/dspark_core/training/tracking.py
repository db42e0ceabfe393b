"""Experiment tracking: the figures of ``metrics.jsonl``, also sent to TensorBoard, W&B, MLflow or trackio.

``report_to`` (``--report-to tensorboard,wandb``) names the backends; none by default. Rank 0 logs every
``metrics.jsonl`` line to each of them at its ``step``, under the same names, leaving out values that
are not finite numbers (``null`` in the file). One exception: MLflow refuses ``@`` in a metric name, so
there ``alpha@0`` is logged as ``alpha_at_0`` (:func:`mlflow_name`).

Each backend is an optional extra of dspark-core (``pip install 'dspark-core[tensorboard]'``) and is
imported only when named; :func:`check_backends` says in one line which extra a missing one needs,
before anything is loaded. Where the data goes:

- ``tensorboard``: ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``);
- ``wandb``: the W&B project ``$WANDB_PROJECT`` (default ``dspark``), files under ``RUN_DIR``;
  ``WANDB_MODE=offline`` keeps it local;
- ``mlflow``: ``$MLFLOW_TRACKING_URI``, or a local SQLite store ``RUN_DIR/mlflow.db``
  (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``); experiment ``$MLFLOW_EXPERIMENT_NAME``
  (default ``dspark``);
- ``trackio``: trackio's local store, project ``$TRACKIO_PROJECT`` (default ``dspark``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dspark_core.errors import DSparkError

__all__ = [
    "BACKENDS",
    "Tracker",
    "Trackers",
    "TrackingBackendMissingError",
    "check_backends",
    "mlflow_name",
    "normalise_report_to",
    "open_trackers",
    "scalars",
]

#: backend -> (the module it needs, the dspark-core extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class TrackingBackendMissingError(DSparkError, ImportError):
    """A backend named in ``report_to`` is not installed."""


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def normalise_report_to(values: Iterable[str]) -> list[str]:
    """``["tensorboard,wandb", "mlflow"]`` -> ``["tensorboard", "wandb", "mlflow"]``; ``none`` is nothing."""
    names: list[str] = []
    for value in values:
        for name in str(value).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    return names


def check_backends(names: Sequence[str]) -> None:
    """Raise one line naming the extra to install for the first named backend that is missing.

    Looks for the modules without importing them (every rank calls this, cheaply, before training).
    """
    for name in names:
        if name not in BACKENDS:
            raise TrackingBackendMissingError(
                f"report_to: unknown backend {name!r}; choose among {', '.join(BACKENDS)}"
            )
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingBackendMissingError(
                f"report_to names {name}, but {module} is not installed: pip install 'dspark-core[{extra}]'"
            )


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.jsonl`` record, ``step`` left out (it is the x axis)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def mlflow_name(name: str) -> str:
    """MLflow allows only alphanumerics, ``_ - . : /`` and spaces in a metric name."""
    return name.replace("@", "_at_")


# -- one adapter per backend --------------------------------------------------------------------


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dspark"),
            name=run_name,
            dir=str(run_dir),
            config=dict(config),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dspark"))
        self.run = mlflow.start_run(run_name=run_name)
        # Parameters are strings of at most a few hundred characters; the config's leaves fit.
        mlflow.log_params({key: str(value)[:500] for key, value in _flat(config).items()})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({mlflow_name(k): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "dspark"), name=run_name, config=dict(config)
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.trackio.log(dict(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


_ADAPTERS: dict[str, Callable[[Path, Mapping[str, Any], str], Tracker]] = {
    "tensorboard": _TensorBoard,
    "wandb": _WandB,
    "mlflow": _MLflow,
    "trackio": _Trackio,
}


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Trackers:
    """The open trackers of a run (none on ranks other than 0)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` record at its ``step``."""
        if not self.trackers:
            return
        metrics = scalars(record)
        for tracker in self.trackers:
            tracker.log(metrics, int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(
    names: Sequence[str], run_dir: str | Path, config: Mapping[str, Any], *, run_name: str | None = None
) -> Trackers:
    """Start a run in each named backend (call on rank 0 only); ``config`` is logged with it."""
    check_backends(names)
    directory = Path(run_dir)
    name = run_name or directory.resolve().name
    opened: list[Tracker] = []
    try:
        for backend in names:
            opened.append(_ADAPTERS[backend](directory, config, name))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
