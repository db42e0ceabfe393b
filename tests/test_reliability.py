"""Reliability of training runs: damaged checkpoints are skipped on resume, kills at any point resume
exactly, a full disk is named, and a run directory without run.json is refused.

Real files and real processes: checkpoints are damaged on disk, runs are SIGKILLed at named points
(``DSPARK_FAULT_KILL_AT``) in subprocesses, and ENOSPC comes from a small tmpfs where one can be mounted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dspark_core.cli import main as cli_main
from dspark_core.training.checkpoint import DiskFullError, verify_directory, verify_export, verify_run
from dspark_core.training.config import TrainConfig
from dspark_core.training.faults import ENV_VAR
from dspark_core.training.metrics import TIMING_KEYS, read_metrics
from dspark_core.training.run_dir import RunDirectoryError
from dspark_core.training.trainer import LossSpikeError, Trainer
from dspark_qwen3.testing import make_tiny_target, tiny_corpus

MAX_STEPS = 8
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("rel") / "target", num_layers=2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [line for line in tiny_corpus() if len(line) > 20]
    rows = [
        {"messages": [{"role": "user", "content": f"Line {i}?"}, {"role": "assistant", "content": lines[i]}]}
        for i in range(12)
    ]
    path = tmp_path_factory.mktemp("rel-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(target: Path, data: Path, output: Path) -> dict[str, Any]:
    # log_every does not divide save_every: resumed metrics must still equal the uninterrupted run's.
    return {
        "target": str(target),
        "data": [str(data)],
        "output_dir": str(output),
        "draft": {"num_draft_layers": 1, "block_size": 4, "num_anchors": 8, "markov_rank": 16},
        "target_layer_ids": [0],
        "batch_size": 2,
        "max_steps": MAX_STEPS,
        "lr": 2e-3,
        "max_length": 48,
        "log_every": 3,
        "save_every": 2,
        "keep_last": 3,
        "progress": False,
        "seed": 5,
    }


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a run's newest checkpoint."""
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state: dict[str, Any] = torch.load(newest / "trainer_state.pt", weights_only=True)
    weights: dict[str, torch.Tensor] = state["model"]
    return weights


def comparable_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = trained_weights(run_dir), trained_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert comparable_metrics(run_dir) == comparable_metrics(reference)
    assert not verify_export(run_dir / "draft")


# -- damaged checkpoints, resumed in this process ----------------------------------------------------


@pytest.fixture(scope="module")
def in_process_runs(
    target_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(an uninterrupted run, a run stopped at step 6 with checkpoints 2, 4 and 6)."""
    root = tmp_path_factory.mktemp("rel-runs")
    reference = root / "reference"
    Trainer(TrainConfig.from_mapping(options(target_dir, data_file, reference))).train()
    stopped = root / "stopped"
    Trainer(TrainConfig.from_mapping(options(target_dir, data_file, stopped))).train(stop_at=6)
    return reference, stopped


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_manifest_key(path: Path, key: str) -> None:
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated state": ("trainer_state.pt", truncate),
    "emptied state": ("trainer_state.pt", lambda p: p.write_bytes(b"")),
    "bit-flipped state": ("trainer_state.pt", flip_bytes),
    "truncated rng": ("rng/rank-00000.pt", truncate),
    "bit-flipped weights": ("draft/model.safetensors", flip_bytes),
    "emptied manifest": ("checkpoint.json", lambda p: p.write_text("")),
    "manifest without step": ("checkpoint.json", lambda p: drop_manifest_key(p, "step")),
    "manifest lost": ("checkpoint.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_ends_like_the_uninterrupted_run(
    case: str,
    in_process_runs: tuple[Path, Path],
    target_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference, stopped = in_process_runs
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    relative, damage = DAMAGE[case]
    newest = run_dir / "checkpoints" / "step-00000006"
    damage(newest / relative)
    assert verify_directory(newest)  # the damage is detected

    resumed = Trainer(TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True}))
    assert resumed.step == 4
    err = capsys.readouterr().err
    assert "skipped checkpoints that do not validate: step-00000006" in err
    assert "moved aside to step-00000006.invalid" in err  # quarantined, not deleted
    resumed.train()
    assert_same_run(run_dir, reference)
    assert all(not problems for problems in verify_run(run_dir).values())
    assert cli_main(["verify", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith("4 ok, 0 damaged")  # 3 checkpoints and draft/


def test_resume_fails_clearly_when_no_checkpoint_validates(
    in_process_runs: tuple[Path, Path], target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(in_process_runs[1], run_dir)
    for state in (run_dir / "checkpoints").glob("step-*/trainer_state.pt"):
        flip_bytes(state)
    config = TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True})
    with pytest.raises(Exception, match=r"no checkpoint validates \(3 found, all damaged\).*--overwrite"):
        Trainer(config)
    assert cli_main(["verify", str(run_dir)]) == 1


def test_checkpoints_without_run_json_are_refused(
    in_process_runs: tuple[Path, Path], target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(in_process_runs[1], run_dir)
    (run_dir / "run.json").unlink()
    config = TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True})
    with pytest.raises(RunDirectoryError, match=r"holds checkpoints but no run.json.*--overwrite"):
        Trainer(config)


def test_resume_may_lower_the_learning_rate(
    in_process_runs: tuple[Path, Path],
    target_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(in_process_runs[1], run_dir)
    config = TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True, "lr": 1e-3})
    resumed = Trainer(config)
    assert "resuming with changed lr: 0.002 -> 0.001" in capsys.readouterr().err
    # The schedule continues at step 6 of the same warmup-cosine shape, scaled to the new peak.
    expected = 1e-3 * resumed.scheduler.lr_lambdas[0](6)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_a_loss_spike_stops_the_run_and_keeps_the_last_good_checkpoint(
    target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "loss_spike_factor": 1.5})
    trainer = Trainer(config)
    trainer.guard.min_history = 2
    trainer.train(stop_at=4)
    with torch.no_grad():
        trainer.draft.markov_head.markov_w2.weight.mul_(1e3)  # a finite but exploded weight
    with pytest.raises(LossSpikeError, match=r"loss exploded at step 5: .*over 1.5x its running median"):
        trainer.train()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


# -- kills at injected points, in real processes ------------------------------------------------------


def run_train(config_file: Path, *, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    if kill_at is not None:
        env[ENV_VAR] = kill_at
    command = [sys.executable, "-m", "dspark_core.train", "--config", str(config_file)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def write_config(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def subprocess_reference(target_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rel-kill-ref")
    config = write_config(root / "config.json", options(target_dir, data_file, root / "run"))
    done = run_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_at", "first_stop"),
    [
        ("state-written", None),  # mid-write of a checkpoint
        ("prune-moved-aside", None),  # mid-prune (keep_last 3 prunes at the 4th save)
        ("export-copied", None),  # mid-export, after the last checkpoint
        ("metrics-rewrite", 5),  # mid-rewrite of metrics.jsonl when a stopped run resumes
    ],
)
def test_sigkill_at_any_point_then_resume_equals_the_uninterrupted_run(
    kill_at: str,
    first_stop: int | None,
    subprocess_reference: Path,
    target_dir: Path,
    data_file: Path,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    values = options(target_dir, data_file, run_dir)
    if first_stop is not None:
        first = run_train(write_config(tmp_path / "first.json", {**values, "stop_at_step": first_stop}))
        assert first.returncode == 0, first.stderr[-3000:]
    config = write_config(tmp_path / "config.json", {**values, "resume": True})
    killed = run_train(config, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if kill_at == "metrics-rewrite":
        assert [r["step"] for r in read_metrics(run_dir)] == [3]  # the old file, whole
    resumed = run_train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, subprocess_reference)


# -- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(
    small_tmpfs: Path, target_dir: Path, data_file: Path
) -> None:
    run_dir = small_tmpfs / "run"
    trainer = Trainer(TrainConfig.from_mapping(options(target_dir, data_file, run_dir)))
    trainer.train(stop_at=2)
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 64 * 1024))
    with pytest.raises(
        DiskFullError, match=r"no space left on device writing .*step-00000004 \(\d+ bytes needed\)"
    ):
        trainer.train(stop_at=4)
    assert not verify_directory(run_dir / "checkpoints" / "step-00000002")
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
