"""The README path, end to end through the CLI: a tiny target, the built-in demo data, a trained and
exported draft whose loss fell and whose tau rose; then ``dspark plot`` of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dspark_core.cli import main as cli_main
from dspark_core.training.metrics import read_metrics

pytestmark = pytest.mark.slow  # a 60-step training run with its demo data generation

STEPS = 60


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    target = root / "tiny-target"
    # A peaked output head: a plain random target's next-token distributions are nearly uniform.
    assert (
        cli_main(["make-tiny-target", str(target), "--random", "--num-layers", "2", "--logit-scale", "30"])
        == 0
    )
    run_dir = root / "runs" / "demo"
    code = cli_main(
        [
            "train",
            "--target",
            str(target),
            "--data",
            "demo",
            "--output",
            str(run_dir),
            "--num-draft-layers",
            "1",
            "--block-size",
            "4",
            "--num-anchors",
            "32",
            "--markov-rank",
            "16",
            "--batch-size",
            "4",
            "--max-steps",
            str(STEPS),
            "--lr",
            "3e-3",
            "--log-every",
            "10",
            "--eval-every",
            "30",
            "--eval-data",
            "demo",
            "--eval-prompts",
            "2",
            "--eval-max-new-tokens",
            "12",
            "--no-progress",
        ]
    )
    assert code == 0
    return run_dir


def test_loss_falls_and_tau_rises_on_the_tiny_target(demo_run: Path) -> None:
    records = read_metrics(demo_run)
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == list(range(10, STEPS + 1, 10))
    first, last = trained[0], trained[-1]
    assert last["loss"] < first["loss"] - 0.1
    assert last["tau_proxy"] > first["tau_proxy"] + 0.05
    assert last["alpha@0"] > first["alpha@0"]
    for record in trained:
        assert {
            "ce",
            "l1",
            "confidence_loss",
            "lr",
            "tokens_per_s",
            "peak_memory_mb",
            "grad_norm",
        } <= record.keys()
        assert [k for k in record if k.startswith("alpha@")] == [f"alpha@{k}" for k in range(4)]
    evaluated = [r for r in records if "eval_tau_pooled" in r]
    assert [r["step"] for r in evaluated] == [30, 60]
    assert all(r["eval_tau_pooled"] >= 1.0 for r in evaluated)
    # The held-out calibration of the confidence head: the running product's ECE at each position.
    for record in evaluated:
        ece = {k: v for k, v in record.items() if k.startswith("eval_running_product_ece@")}
        assert list(ece) == [f"eval_running_product_ece@{k}" for k in range(4)]
        assert ece["eval_running_product_ece@0"] is not None
        assert all(v is None or 0.0 <= v <= 1.0 for v in ece.values())


def test_demo_data_is_the_targets_own_output_and_the_export_loads(demo_run: Path) -> None:
    rows = [json.loads(line) for line in (demo_run / "data" / "demo-train.jsonl").read_text().splitlines()]
    assert len(rows) == 70
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in rows)
    from dspark_qwen3.modeling import Qwen3DSparkModel

    draft: Any = Qwen3DSparkModel.from_pretrained(demo_run / "draft")
    assert draft.config.block_size == 4 and draft.config.num_hidden_layers == 1
    assert all(torch.isfinite(p).all() for p in draft.parameters())


def test_plot_writes_three_pngs(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    assert cli_main(["plot", str(demo_run), "--output", str(out)]) == 0
    for name in ("loss.png", "tau.png", "acceptance.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name


def test_plot_without_matplotlib_says_how_to_install_it(demo_run: Path) -> None:
    # None in sys.modules makes `import matplotlib` fail, as on a machine without it.
    probe = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from dspark_core.cli import main\n"
        f"sys.exit(main(['plot', {str(demo_run)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 1
    assert "needs matplotlib" in done.stderr and "dspark-core[plot]" in done.stderr
