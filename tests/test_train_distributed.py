"""Two gloo ranks under torchrun (DDP or FSDP2) train like one rank on the combined batch, across a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dspark_core.modeling.blocks import sample_anchors
from dspark_core.training.config import TrainConfig
from dspark_core.training.distributed import fsdp_available, rank_seed
from dspark_core.training.metrics import read_metrics
from dspark_core.training.trainer import Trainer
from dspark_qwen3.testing import make_tiny_target, tiny_corpus

pytestmark = pytest.mark.slow  # two torchrun ranks, each importing torch and transformers

STEPS = 3
# max_length <= num_anchors: every candidate position becomes an anchor, so the blocks do not
# depend on the RNG and one rank on the combined batch sees exactly the blocks the two ranks see.
OPTIONS: dict[str, Any] = {
    "num_draft_layers": 1,
    "block_size": 4,
    "num_anchors": 64,
    "max_length": 48,
    "markov_rank": 16,
    "target_layer_ids": [0, 1],
    "max_steps": STEPS,
    "lr": 3e-3,
    "warmup_steps": 1,
    "log_every": 1,
    "save_every": 100,
    "progress": False,
    "seed": 5,
}
COMPARED = ("loss", "ce", "l1", "confidence_loss", "tau_proxy", "alpha@0", "alpha@3", "confidence_ece")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    target = make_tiny_target(root / "target", num_layers=2)
    lines = [line for line in tiny_corpus() if len(line) > 20]
    data = root / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Line {i}?"}, {"role": "assistant", "content": lines[i]}]}
        for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target, data


def single_process(target: Path, data: Path, output: Path, **extra: Any) -> Trainer:
    assert not dist.is_initialized()
    config = TrainConfig.from_mapping(
        {
            **OPTIONS,
            **extra,
            "target": str(target),
            "data": [str(data)],
            "output_dir": str(output),
            "batch_size": 4,
        }
    )
    trainer = Trainer(config)
    trainer.train()
    return trainer


def torchrun(
    target: Path,
    data: Path,
    output: Path,
    parallelism: str,
    *extra: str,
    options: dict[str, Any] | None = None,
) -> None:
    flags: list[str] = list(extra)
    for key, value in {**OPTIONS, **(options or {}), "batch_size": 2, "parallelism": parallelism}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, ",".join(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dspark_core.train",
        "--target",
        str(target),
        "--data",
        str(data),
        "--output",
        str(output),
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


NO_FSDP = pytest.mark.skipif(not fsdp_available(), reason="this torch has no FSDP2 fully_shard")


@pytest.mark.parametrize(
    ("parallelism", "draft_vocab_size"),
    [
        ("ddp", None),
        pytest.param("fsdp", None, marks=NO_FSDP),
        # A reduced vocabulary: its own trainable lm_head and d2t, through both wrappers.
        ("ddp", 64),
        pytest.param("fsdp", 64, marks=NO_FSDP),
    ],
)
def test_two_gloo_ranks_match_one_rank_on_the_combined_batch(
    setup: tuple[Path, Path], tmp_path: Path, parallelism: str, draft_vocab_size: int | None
) -> None:
    target, data = setup
    extra = {} if draft_vocab_size is None else {"draft_vocab_size": draft_vocab_size}
    reference = single_process(target, data, tmp_path / "one", **extra)
    # The two-rank run is interrupted after step 2 and resumed, to cover every rank's saved state too.
    torchrun(target, data, tmp_path / "two", parallelism, "--stop-at-step", "2", options=extra)
    assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2]
    torchrun(target, data, tmp_path / "two", parallelism, "--resume", options=extra)

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert a["tokens"] == b["tokens"]  # the same rows, split over two ranks
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # The loss moved, so the comparison is not between two untrained drafts.
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-3)
    exported = load_file(tmp_path / "two" / "draft" / "model.safetensors")
    for name, param in reference.draft.named_parameters():
        torch.testing.assert_close(exported[name], param.detach(), rtol=1e-4, atol=1e-5, msg=name)
    if draft_vocab_size is not None:
        assert torch.equal(exported["d2t"], reference.draft.d2t)
        assert reference.draft.lm_head.weight.requires_grad
    last = tmp_path / "two" / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((last / "checkpoint.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]


def test_each_rank_draws_its_own_reproducible_anchors() -> None:
    loss_mask = torch.ones(2, 64, dtype=torch.long)

    def anchors(rank: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(rank_seed(0, rank, "anchors"))
        return sample_anchors(loss_mask, 8, generator=generator)[0]

    assert torch.equal(anchors(0), anchors(0))
    assert torch.equal(anchors(1), anchors(1))
    assert not torch.equal(anchors(0), anchors(1))
    assert len({rank_seed(0, r, s) for r in range(4) for s in ("anchors", "python", "torch")}) == 12
