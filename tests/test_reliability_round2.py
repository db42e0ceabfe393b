"""Reliability, second round (issue 20): a manifest that proves itself, one run per directory, resume
after a kill at the very first writes, a full disk named in one line wherever it strikes, a spike
guard that watches from step 1, quarantine instead of deletion, response_ids checked against their
content, and transformers' output held to the CLI's one-line policy.

Real files and real processes, as in ``test_reliability.py`` (whose run options and reference runs
these tests share): manifests are edited byte by byte, runs are started side by side or SIGKILLed at
named points, and ENOSPC comes from a small tmpfs where one can be mounted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The fixtures of test_reliability.py, shared (pytest finds fixtures imported into a test module).
from test_reliability import TIMEOUT_S, assert_same_run, options, run_train, write_config

from dspark_core.training import checkpoint
from dspark_core.training.config import TrainConfig
from dspark_core.training.faults import ENV_VAR
from dspark_core.training.metrics import read_metrics
from dspark_core.training.trainer import Trainer
from dspark_qwen3.testing import make_tiny_target, tiny_corpus

# The runs of test_reliability.py's options, built once for this module.


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("rel2") / "target", num_layers=2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [line for line in tiny_corpus() if len(line) > 20]
    rows = [
        {"messages": [{"role": "user", "content": f"Line {i}?"}, {"role": "assistant", "content": lines[i]}]}
        for i in range(12)
    ]
    path = tmp_path_factory.mktemp("rel2-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def in_process_runs(
    target_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(an uninterrupted run, a run stopped at step 6 with checkpoints 2, 4 and 6)."""
    root = tmp_path_factory.mktemp("rel2-runs")
    reference = root / "reference"
    Trainer(TrainConfig.from_mapping(options(target_dir, data_file, reference))).train()
    stopped = root / "stopped"
    Trainer(TrainConfig.from_mapping(options(target_dir, data_file, stopped))).train(stop_at=6)
    return reference, stopped


@pytest.fixture(scope="module")
def subprocess_reference(target_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rel2-kill-ref")
    config = write_config(root / "config.json", options(target_dir, data_file, root / "run"))
    done = run_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def dspark(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dspark_core.cli", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop(ENV_VAR, None)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)


# -- 1. the manifest verifies itself ----------------------------------------------------------------


def edit_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, (old, data)
    path.write_bytes(data.replace(old, new))


MANIFEST_EDITS = {
    # One bit of an ASCII digit: '6' (0x36) -> '7' (0x37).
    "step digit": (b'"step": 6,', b'"step": 7,'),
    "data position": (b'"index": 12', b'"index": 13'),
    "step as a word": (b'"step": 6,', b'"step": "six",'),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_an_edited_manifest_is_a_damaged_checkpoint(
    case: str,
    in_process_runs: tuple[Path, Path],
    target_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference, stopped = in_process_runs
    run_dir = copy_run(stopped, tmp_path / "run")
    manifest = run_dir / "checkpoints" / "step-00000006" / "checkpoint.json"
    edit_bytes(manifest, *MANIFEST_EDITS[case])

    resumed = Trainer(TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True}))
    assert resumed.step == 4  # fell back past the edited manifest, to the checkpoint before it
    err = capsys.readouterr().err
    assert f"{manifest} does not match its own digest (edited or corrupted)" in err
    resumed.train()
    assert_same_run(run_dir, reference)


def test_a_manifest_seals_its_own_content(in_process_runs: tuple[Path, Path]) -> None:
    manifest = json.loads(
        (in_process_runs[1] / "checkpoints" / "step-00000006" / "checkpoint.json").read_text()
    )
    assert manifest["version"] == 3
    assert manifest["manifest_sha256"] == checkpoint.manifest_digest(manifest)
    export = json.loads((in_process_runs[0] / "draft" / "dspark_export.json").read_text())
    assert export["manifest_sha256"] == checkpoint.manifest_digest(export)


def test_an_edited_export_manifest_does_not_verify(
    in_process_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = copy_run(in_process_runs[0], tmp_path / "run")
    edit_bytes(run_dir / "draft" / "dspark_export.json", b'"step": 8', b'"step": 9')
    assert checkpoint.verify_export(run_dir / "draft") == [
        f"{run_dir / 'draft' / 'dspark_export.json'} does not match its own digest (edited or corrupted)"
    ]


# -- 2. one run per directory -------------------------------------------------------------------------


def hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    """Another process holding ``run_dir``'s lock (as host 'elsewhere') for as long as it lives."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(run_dir / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        'os.write(fd, b\'{"pid": %d, "host": "elsewhere", "since": 0}\' % os.getpid())\n'
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def start_train(config_file: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    command = [sys.executable, "-m", "dspark_core.cli", "train", "--config", str(config_file)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_trainings_into_one_directory_one_is_refused_naming_the_holder(
    subprocess_reference: Path, target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.json", {**options(target_dir, data_file, run_dir), "resume": True}
    )
    first, second = start_train(config), start_train(config)
    outcomes = {}
    for process in (first, second):
        _out, err = process.communicate(timeout=TIMEOUT_S)
        outcomes[process.pid] = (process.returncode, err)
    codes = sorted(code for code, _ in outcomes.values())
    assert codes == [0, 1], outcomes
    winner = next(pid for pid, (code, _) in outcomes.items() if code == 0)
    refusal = next(err for code, err in outcomes.values() if code == 1)
    lines = [line for line in refusal.splitlines() if line.strip()]
    assert len(lines) == 1, refusal
    assert re.fullmatch(
        rf"dspark train: error: {re.escape(str(run_dir))} is in use by another training run "
        rf"\(pid {winner} on host {re.escape(os.uname().nodename)}, since .*\); "
        r"wait for it to end, or train into another output directory",
        lines[0],
    ), lines[0]
    assert [r["step"] for r in read_metrics(run_dir)] == [3, 6, 8]  # each line once
    assert_same_run(run_dir, subprocess_reference)


def test_a_locked_directory_refuses_a_trainer_in_this_process(
    target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        config = TrainConfig.from_mapping(options(target_dir, data_file, run_dir))
        with pytest.raises(
            Exception, match=rf"in use by another training run \(pid {holder.pid} on host elsewhere"
        ):
            Trainer(config)
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: no cleanup, the next start takes it.
    trainer = Trainer(TrainConfig.from_mapping(options(target_dir, data_file, run_dir)))
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    trainer.close()


@pytest.mark.slow
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_gets_its_verdict(
    target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.json", options(target_dir, data_file, run_dir))
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "dspark_core.train", "--config", str(config)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    holder = hold_lock(run_dir)
    try:
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    held = f"is in use by another training run (pid {holder.pid} on host elsewhere"
    assert f"dspark train: error: {run_dir} {held}" in output  # rank 0
    assert f"dspark train: error: rank 0 failed: RunLockedError: {run_dir} {held}" in output  # rank 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing else was touched
    # Both ranks train once the holder is gone; had rank 1 taken the lock too, rank 0 would hold it.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run_dir / "checkpoints" / "step-00000008" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2


# -- 3. resume after a kill at the very first writes ---------------------------------------------------


@pytest.mark.slow
def test_a_kill_while_run_json_is_written_then_resume_equals_the_uninterrupted_run(
    subprocess_reference: Path, target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.json", {**options(target_dir, data_file, run_dir), "resume": True}
    )
    killed = run_train(config, kill_at="run-json-written")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / ".tmp-run.json").is_file() and not (run_dir / "run.json").exists()
    resumed = run_train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed a temporary entry of an interrupted run" in resumed.stderr
    assert_same_run(run_dir, subprocess_reference)
    assert not [p for p in run_dir.rglob(".tmp-*")]


def test_a_run_never_calls_its_own_leftovers_foreign(
    target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (".tmp-run.json", ".tmp-metrics.jsonl", "run.lock"):
        (run_dir / name).write_text("{")
    (run_dir / ".tmp-draft").mkdir()
    trainer = Trainer(TrainConfig.from_mapping(options(target_dir, data_file, run_dir)))
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json", "run.lock"]
    trainer.close()


# -- 4. a full disk, anywhere, in one line -------------------------------------------------------------

DISK_FULL = r"no space left on device writing {path} \((\d+) bytes needed\)"


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


def fill(volume: Path, leave: int) -> None:
    """Fill ``volume`` until ``leave`` bytes are free (tmpfs counts whole 4 KiB pages)."""
    free = shutil.disk_usage(volume).free
    (volume / f"filler-{uuid.uuid4().hex[:6]}").write_bytes(b"\0" * max(0, free - leave))


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


def sizes(checkpoint_dir: Path) -> dict[str, int]:
    return {
        "state": (checkpoint_dir / "trainer_state.pt").stat().st_size,
        "rng": (checkpoint_dir / "rng" / "rank-00000.pt").stat().st_size,
        "draft": sum(p.stat().st_size for p in (checkpoint_dir / "draft").rglob("*") if p.is_file()),
    }


@pytest.mark.parametrize("where", ["state", "draft"])
def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(
    where: str, small_tmpfs: Path, target_dir: Path, data_file: Path
) -> None:
    run_dir = small_tmpfs / "run"
    trainer = Trainer(TrainConfig.from_mapping(options(target_dir, data_file, run_dir)))
    trainer.train(stop_at=2)
    previous = run_dir / "checkpoints" / "step-00000002"
    size = sizes(previous)
    assert size["draft"] > 64 * 1024, size  # the draft needs more than the slack left below
    # "state": not even the trainer state fits; "draft": the state fits, the draft's weights do not.
    fill(small_tmpfs, 16 * 1024 if where == "state" else size["state"] + size["rng"] + 48 * 1024)
    with pytest.raises(checkpoint.DiskFullError) as info:
        trainer.train(stop_at=4)
    message = str(info.value)
    assert re.match(DISK_FULL.format(path=re.escape(str(run_dir / "checkpoints" / "step-00000004"))), message)
    assert f"the previous checkpoint {previous} is intact" in message
    assert "\n" not in message
    assert not checkpoint.verify_directory(previous)
    assert temporaries(run_dir) == []


def test_a_full_disk_in_the_final_export_is_one_line(
    small_tmpfs: Path, target_dir: Path, data_file: Path
) -> None:
    run_dir = small_tmpfs / "run"
    trainer = Trainer(TrainConfig.from_mapping(options(target_dir, data_file, run_dir)))
    trainer.train(stop_at=7)  # a checkpoint at step 7, not exported (that happens at max_steps)
    assert trainer.last_checkpoint is not None and not (run_dir / "draft").exists()
    fill(small_tmpfs, 16 * 1024)
    with pytest.raises(
        checkpoint.DiskFullError, match=DISK_FULL.format(path=re.escape(str(run_dir / "draft")))
    ):
        trainer.checkpointer.export_final(trainer.last_checkpoint)
    assert temporaries(run_dir) == [] and not (run_dir / "draft").exists()
    assert not checkpoint.verify_directory(trainer.last_checkpoint.path)


def test_a_full_disk_while_metrics_are_appended_is_one_line(
    small_tmpfs: Path, target_dir: Path, data_file: Path
) -> None:
    from dspark_core.training.metrics import MetricsLog

    log = MetricsLog(small_tmpfs / "metrics.jsonl", active=True)
    fill(small_tmpfs, 8 * 1024)  # room for a few lines, then a line that tears at the edge
    record = {"step": 1, "loss": 1.0, "padding": "x" * 1000}
    with pytest.raises(checkpoint.DiskFullError) as info:
        for step in range(1, 10_000):
            log.write({**record, "step": step})
    assert re.fullmatch(DISK_FULL.format(path=re.escape(str(log.path))), str(info.value))
    steps = [r["step"] for r in read_metrics(log.path)]
    assert steps and steps == list(range(1, len(steps) + 1))  # whole lines: the torn one was cut back
    assert log.path.read_bytes().endswith(b"\n")


def test_the_cli_prints_a_full_disk_as_one_line(
    small_tmpfs: Path, target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = small_tmpfs / "run"
    values = options(target_dir, data_file, run_dir)
    first = dspark("train", "--config", str(write_config(tmp_path / "a.json", {**values, "stop_at_step": 2})))
    assert first.returncode == 0, first.stderr[-3000:]
    fill(small_tmpfs, 16 * 1024)
    second = dspark("train", "--config", str(write_config(tmp_path / "b.json", {**values, "resume": True})))
    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"dspark train: error: "
        + DISK_FULL.format(path=re.escape(str(run_dir / "checkpoints" / "step-00000004")))
        + r"; the previous checkpoint .*step-00000002 is intact; "
        + r"free space or move output_dir, then --resume",
        last,
    ), second.stderr[-3000:]
    assert temporaries(run_dir) == []


# -- 5. the spike guard from step 1, and an lr the optimizer cannot hold -------------------------------


def test_an_exploding_loss_in_the_first_steps_stops_the_run(
    target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    values = {**options(target_dir, data_file, run_dir), "lr": 1e6, "ignore_limits": True}
    done = dspark("train", "--config", str(write_config(tmp_path / "config.json", values)))
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(
        r"dspark train: error: the loss exploded at step [2-8]: .* over 100x the first step's loss", last
    )
    assert not (run_dir / "draft").exists()  # no garbage draft exported


@pytest.mark.parametrize("lr", ["1e38", "3e38"])
def test_an_lr_the_optimizer_cannot_represent_is_refused_even_with_ignore_limits(
    lr: str, target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    values = {**options(target_dir, data_file, run_dir), "ignore_limits": True}
    done = dspark("train", "--config", str(write_config(tmp_path / "config.json", values)), "--lr", lr)
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        line for line in done.stderr.splitlines() if line.startswith("dspark train: error:")
    ]
    assert f"lr {float(lr)!r} cannot be represented in training" in done.stderr
    assert not run_dir.exists()  # refused before anything was built


def test_the_first_loss_survives_a_resume(in_process_runs: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    stopped = in_process_runs[1]
    state = torch.load(stopped / "checkpoints" / "step-00000006" / "trainer_state.pt", weights_only=True)
    first = torch.load(stopped / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=True)
    assert state["first_loss"] == first["loss_history"][0] == first["first_loss"]


# -- 6. quarantine, never delete -----------------------------------------------------------------------


def test_a_checkpoint_whose_manifest_alone_was_lost_is_quarantined_then_pruned(
    in_process_runs: tuple[Path, Path],
    target_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference, stopped = in_process_runs
    run_dir = copy_run(stopped, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-00000006"
    weights = (newest / "trainer_state.pt").read_bytes()
    (newest / "checkpoint.json").unlink()

    resumed = Trainer(TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True}))
    assert resumed.step == 4
    assert "moved aside to step-00000006.invalid" in capsys.readouterr().err
    aside = run_dir / "checkpoints" / "step-00000006.invalid"
    assert (aside / "trainer_state.pt").read_bytes() == weights  # kept, intact
    resumed.train()
    assert_same_run(run_dir, reference)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006", "step-00000006.invalid", "step-00000008"]
    assert checkpoint.quarantined(run_dir) == [aside]
    # Removed only where a valid checkpoint of its step would be: by keep_last pruning.
    checkpoint.CheckpointManager(run_dir / "checkpoints", keep_last=1).prune()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000008"]


def test_when_no_checkpoint_validates_nothing_is_moved_and_resume_keeps_refusing(
    in_process_runs: tuple[Path, Path], target_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(in_process_runs[1], tmp_path / "run")
    for manifest in (run_dir / "checkpoints").glob("step-*/checkpoint.json"):
        edit_bytes(manifest, b'"format": "dspark-checkpoint"', b'"format": "dspark-checkpoinT"')
    config = TrainConfig.from_mapping({**options(target_dir, data_file, run_dir), "resume": True})
    for _attempt in range(2):  # never a silent restart from step 0
        with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint validates \(3 found"):
            Trainer(config)
    assert checkpoint.quarantined(run_dir) == []


# -- 7. response_ids against their content --------------------------------------------------------------


def test_response_ids_that_are_not_the_contents_tokens_name_the_row(target_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from dspark_core.training.data import DatasetError, TokenizedDataset

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    good = "The quick brown fox."
    other = "Entirely different words here."

    def row(content: str, ids_of: str) -> str:
        ids = tokenizer(ids_of, add_special_tokens=False)["input_ids"]
        turn = {"role": "assistant", "content": content, "response_ids": ids}
        return json.dumps({"messages": [{"role": "user", "content": "Say it."}, turn]}) + "\n"

    path = tmp_path / "rows.jsonl"
    path.write_text(row(good, good) + row(good, other))
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(path))}:2: turn 1's response_ids decode to"
    ) as info:
        TokenizedDataset.from_jsonl(path, tokenizer)
    assert "'Entirely different words here.' but its content is 'The quick brown fox.'" in str(info.value)
    path.write_text(row(good, good))
    assert len(TokenizedDataset.from_jsonl(path, tokenizer)) == 1


# -- 8. transformers' output through the one-line policy ------------------------------------------------


@pytest.fixture(scope="module")
def target_missing_a_weight(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    damaged = tmp_path_factory.mktemp("missing") / "target"
    shutil.copytree(target_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    return damaged


def test_a_load_report_is_one_line_and_the_table_needs_verbose(
    target_missing_a_weight: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello?"}]}) + "\n")
    args = ["--target", str(target_missing_a_weight), "--input", str(prompts), "--max-new-tokens", "2"]
    quiet = dspark("regenerate", *args, "--output", str(tmp_path / "a.jsonl"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    reports = [line for line in quiet.stderr.splitlines() if "LOAD REPORT" in line]
    assert len(reports) == 1, quiet.stderr
    assert re.fullmatch(
        r"warning: transformers: \w+ LOAD REPORT from: .*: 1 missing key\(s\) \(run with --verbose .*\)",
        reports[0],
    )
    assert not [line for line in quiet.stderr.splitlines() if "model.norm.weight" in line or "|" in line]

    verbose = dspark("regenerate", "--verbose", *args, "--output", str(tmp_path / "b.jsonl"))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert any("model.norm.weight" in line and "MISSING" in line for line in verbose.stderr.splitlines())


def test_transformers_advice_is_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig, Qwen3Config

    from dspark_core.cli.library_output import routed_library_output

    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with routed_library_output(verbose=False):
        Qwen3Config.from_pretrained(tmp_path)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(
        "warning: transformers: You are using a model of type `llama` to instantiate a model of type `qwen3`."
    ), err
