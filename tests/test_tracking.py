"""``train --report-to``: every tracker gets the figures of ``metrics.jsonl``, under the same names.

One short training run logs to every installed backend, each writing locally: TensorBoard event files,
an MLflow SQLite store, W&B in offline mode, trackio's local database. Each test reads the values
back through the backend's own files and compares them with ``metrics.jsonl``. A backend that is not
installed skips its test (``pip install 'dspark-core[tracking]'`` installs them all).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspark_core.training.config import TrainConfig
from dspark_core.training.metrics import read_metrics
from dspark_core.training.tracking import mlflow_name, normalise_report_to, scalars
from dspark_core.training.trainer import Trainer
from dspark_qwen3.testing import make_tiny_target, tiny_corpus

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]


def needs(backend: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        backend not in INSTALLED, reason=f"{backend} is not installed (pip install 'dspark-core[{backend}]')"
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 6-step run logging every 2 steps to every installed tracker; its records and directories."""
    if not INSTALLED:
        pytest.skip("no tracking backend is installed (pip install 'dspark-core[tracking]')")
    root = tmp_path_factory.mktemp("tracking")
    target = make_tiny_target(root / "target", num_layers=2)
    lines = [line for line in tiny_corpus() if len(line) > 20]
    rows = [
        {"messages": [{"role": "user", "content": f"Say line {i}."}, {"role": "assistant", "content": line}]}
        for i, line in enumerate(lines[:12])
    ]
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig.from_mapping(
        {
            "target": str(target),
            "data": [str(data)],
            "output_dir": str(root / "run"),
            "draft": {"num_draft_layers": 1, "block_size": 4, "num_anchors": 8, "target_layer_ids": [0, 1]},
            "batch_size": 2,
            "max_steps": 6,
            "log_every": 2,
            "max_length": 48,
            "progress": False,
            "report_to": ",".join(INSTALLED),
        }
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "dspark-test")
        env.setenv("TRACKIO_DIR", str(root / "trackio"))
        env.setenv("TRACKIO_PROJECT", "dspark-test")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = Trainer(config).train()
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [2, 4, 6]
    yield {"run_dir": result.run_dir, "records": records, "trackio_dir": root / "trackio"}


def expected(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """name -> step -> value, for every finite number of metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in scalars(record).items():
            out.setdefault(name, {})[int(record["step"])] = value
    return out


def assert_same(
    logged: dict[str, dict[int, float]], records: list[dict[str, Any]], rel: float = 1e-12
) -> None:
    want = expected(records)
    assert "alpha@0" in want and "loss" in want and "tokens_per_s" in want
    assert set(logged) == set(want)
    for name, by_step in want.items():
        assert logged[name] == pytest.approx(by_step, rel=rel), name


@needs("tensorboard")
def test_tensorboard_event_files_hold_the_metrics(run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["run_dir"] / "tensorboard"))
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert_same(logged, run["records"], rel=1e-6)  # TensorBoard stores float32


@needs("mlflow")
def test_mlflow_local_store_holds_the_metrics(run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run['run_dir'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dspark")
    assert experiment is not None
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.params["max_steps"] == "6"
    logged: dict[str, dict[int, float]] = {}
    for name in expected(run["records"]):
        history = client.get_metric_history(mlflow_run.info.run_id, mlflow_name(name))
        logged[name] = {m.step: m.value for m in history}
    assert set(mlflow_run.data.metrics) == {mlflow_name(n) for n in logged}
    assert_same(logged, run["records"])


def wandb_history(path: Path) -> dict[str, dict[int, float]]:
    """The history rows of an offline ``.wandb`` file (a log of 32 KiB blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pieces = 32768, 7, []
    logged: dict[str, dict[int, float]] = {}
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # _step, _runtime, _timestamp: W&B's own
                        logged.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return logged


@needs("wandb")
def test_wandb_offline_run_holds_the_metrics(run: dict[str, Any]) -> None:
    (file,) = glob.glob(str(run["run_dir"] / "wandb" / "offline-run-*" / "*.wandb"))
    assert_same(wandb_history(Path(file)), run["records"])


@needs("trackio")
def test_trackio_local_store_holds_the_metrics(run: dict[str, Any]) -> None:
    code = (
        "import json, sys\n"
        "from trackio.sqlite_storage import SQLiteStorage\n"
        "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))\n"
    )
    # A fresh process: trackio reads TRACKIO_DIR when it is imported.
    out = subprocess.run(
        [sys.executable, "-c", code, "dspark-test", run["run_dir"].name],
        env={**os.environ, "TRACKIO_DIR": str(run["trackio_dir"])},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    logged: dict[str, dict[int, float]] = {}
    for row in json.loads(out.strip().splitlines()[-1]):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, int | float):
                logged.setdefault(key, {})[int(row["step"])] = value
    assert_same(logged, run["records"])


def test_report_to_accepts_commas_and_none() -> None:
    assert normalise_report_to(["tensorboard,wandb", "mlflow", "wandb"]) == ["tensorboard", "wandb", "mlflow"]
    assert normalise_report_to(["none"]) == []
    assert TrainConfig.from_mapping({"report_to": "tensorboard, trackio"}).report_to == [
        "tensorboard",
        "trackio",
    ]
    assert TrainConfig().report_to == []


def test_a_missing_backend_is_one_line_naming_its_extra(tmp_path: Path) -> None:
    """A real environment without the trackers: dspark_core and pluggy alone, no site-packages."""
    import pluggy

    import dspark_core

    shutil.copytree(Path(dspark_core.__file__).parent, tmp_path / "dspark_core")
    shutil.copytree(Path(pluggy.__file__).parent, tmp_path / "pluggy")
    result = subprocess.run(
        [
            *(sys.executable, "-S", "-m", "dspark_core.cli", "train", "--report-to", "wandb,mlflow"),
            *("--target", "t", "--data", "d.jsonl", "--output", str(tmp_path / "run")),
        ],
        env={"PYTHONPATH": str(tmp_path), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    missing = "report_to names wandb, but wandb is not installed: pip install 'dspark-core[wandb]'"
    assert result.stderr.strip().splitlines() == [f"dspark train: error: {missing}"]
