"""Checkpoints and resumption: exact continuation, interrupted saves, NaN stops, run-directory policy,
and the exported draft."""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dspark_core.modeling.features import capture_target_features
from dspark_core.modeling.loss import DSparkObjective
from dspark_core.training.checkpoint import CheckpointManager
from dspark_core.training.config import ConfigError, TrainConfig
from dspark_core.training.data import Collator, DatasetError, Example, pack_examples
from dspark_core.training.metrics import TIMING_KEYS, read_metrics
from dspark_core.training.trainer import (
    NonFiniteLossError,
    RunDirectoryError,
    Trainer,
    batch_target_features,
)
from dspark_qwen3.modeling import Qwen3DSparkModel
from dspark_qwen3.testing import make_tiny_target, tiny_corpus


def chat_rows(count: int) -> list[dict[str, Any]]:
    lines = [line for line in tiny_corpus() if len(line) > 20]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say line {i}."},
                {"role": "assistant", "content": lines[i % len(lines)]},
            ]
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("ckpt") / "target", num_layers=2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    return path


@pytest.fixture
def base(target_dir: Path, data_file: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig.from_mapping(
        {
            "target": str(target_dir),
            "data": [str(data_file)],
            "output_dir": str(tmp_path / "run"),
            "draft": {
                "num_draft_layers": 1,
                "block_size": 4,
                "num_anchors": 8,
                "markov_rank": 16,
                "target_layer_ids": [0, 1],
            },
            "batch_size": 2,
            "max_steps": 10,
            "lr": 2e-3,
            "warmup_steps": 2,
            "max_length": 48,
            "log_every": 1,
            "save_every": 3,
            "keep_last": 2,
            "progress": False,
            "seed": 3,
        }
    )


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.draft.named_parameters() if v.requires_grad}


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_ten_steps_equal_five_steps_resume_five_steps(base: TrainConfig, tmp_path: Path) -> None:
    # Gradient accumulation and packing (several epochs of few rows) are on, to cover their state too.
    config = dataclasses.replace(base, grad_accum=2, pack=True, max_length=128, batch_size=1)
    whole = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / "whole")))
    whole.train()
    whole_metrics = read_metrics(tmp_path / "whole")

    split_dir = tmp_path / "split"
    first = Trainer(dataclasses.replace(config, output_dir=str(split_dir)))
    first.train(stop_at=5)
    assert first.step == 5
    assert step_names(split_dir) == ["step-00000003", "step-00000005"]
    del first
    second = Trainer(dataclasses.replace(config, output_dir=str(split_dir), resume=True))
    assert second.step == 5 and second.position.epoch >= 1
    second.train()

    assert whole.step == second.step == 10
    expected, resumed = trainable_state(whole), trainable_state(second)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    split_metrics = read_metrics(split_dir)
    assert [r["step"] for r in split_metrics] == list(range(1, 11))
    assert comparable(split_metrics) == comparable(whole_metrics)
    # keep_last=2, saves every 3 steps and at the end.
    assert step_names(split_dir) == step_names(tmp_path / "whole") == ["step-00000009", "step-00000010"]
    assert (split_dir / "draft" / "model.safetensors").is_file()


def test_interrupted_save_leaves_the_previous_checkpoint_and_resume_uses_it(
    base: TrainConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(base, max_steps=4, save_every=2, output_dir=str(tmp_path / "run"))
    trainer = Trainer(config)
    trainer.train(stop_at=2)
    # Fail the next save half-way: the RNG files fit under the limit, the weights and optimizer do not.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises((OSError, RuntimeError)):
            trainer.train()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=2)
    assert [info.step for info in manager.complete()] == [2]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [".tmp-step-00000004"]
    assert (run_dir / "checkpoints" / leftovers[0] / "rng" / "rank-00000.pt").is_file()
    # The previous checkpoint still loads, and its export is a working draft.
    Qwen3DSparkModel.from_pretrained(run_dir / "checkpoints" / "step-00000002" / "draft")

    resumed = Trainer(dataclasses.replace(config, resume=True))
    assert resumed.step == 2
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    resumed.train()
    reference = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / "reference")))
    reference.train()
    for name, value in trainable_state(reference).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base: TrainConfig, tmp_path: Path) -> None:
    config = dataclasses.replace(base, max_steps=6, save_every=2)
    trainer = Trainer(config)
    trainer.train(stop_at=2)
    with torch.no_grad():
        trainer.draft.fc.weight.fill_(float("nan"))  # a diverged weight
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*step-00000002 \(step 2\)"):
        trainer.train()
    run_dir = Path(config.output_dir)
    assert step_names(run_dir) == ["step-00000002"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    resumed = Trainer(dataclasses.replace(config, resume=True))
    assert resumed.step == 2
    assert all(torch.isfinite(p).all() for p in resumed.draft.parameters())


def test_run_directory_policy_and_incompatible_resume(
    base: TrainConfig, data_file: Path, tmp_path: Path
) -> None:
    Trainer(base).train(stop_at=1)
    with pytest.raises(RunDirectoryError, match=r"holds another training run.*--resume.*--overwrite"):
        Trainer(base)
    changed = base.updated({"resume": True, "weight_decay": 0.1, "block_size": 5, "log_every": 7})
    with pytest.raises(ConfigError) as info:
        Trainer(changed)
    message = str(info.value)
    assert "weight_decay: 0.0 -> 0.1" in message and "block_size: 4 -> 5" in message
    assert "log_every" not in message  # logging may change on resume

    # Same config, different data contents behind the same path.
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(17)))
    moved = dataclasses.replace(base, data=[str(other_data)])
    Trainer(dataclasses.replace(moved, overwrite=True)).train(stop_at=1)
    other_data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(18)))
    with pytest.raises(DatasetError, match="training data changed"):
        Trainer(dataclasses.replace(moved, resume=True))

    fresh = Trainer(dataclasses.replace(base, overwrite=True))
    assert fresh.step == 0 and not (Path(base.output_dir) / "checkpoints").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty and holds no dspark run"):
        Trainer(dataclasses.replace(base, output_dir=str(foreign)))


def test_exported_draft_loads_with_identical_logits(base: TrainConfig) -> None:
    trainer = Trainer(dataclasses.replace(base, max_steps=2))
    result = trainer.train()
    assert result.export_dir is not None and result.checkpoint is not None
    loaded = Qwen3DSparkModel.from_pretrained(result.export_dir).eval()
    draft: Any = trainer.draft
    draft.eval()
    assert loaded.config.architectures == ["Qwen3DSparkModel"]
    assert loaded.config.mask_token_id == draft.config.mask_token_id
    batch = Collator(pad_token_id=0)(trainer.data.rows[:2])  # type: ignore[arg-type]
    features = batch_target_features(trainer.target, batch, trainer.layer_ids)
    anchors = torch.tensor([[1, 5, 9], [2, 6, 10]])
    with torch.no_grad():
        outputs = [
            model(
                batch["input_ids"],
                features.features,
                features.final_hidden,
                batch["loss_mask"],
                anchors=anchors,
                return_logits=True,
            )
            for model in (draft, loaded)
        ]
    assert outputs[0].logits is not None and outputs[1].logits is not None
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    losses = [DSparkObjective()(model, out).loss for model, out in zip((draft, loaded), outputs, strict=True)]
    assert torch.equal(losses[0], losses[1])
    # The checkpoint's own export is the same file as the final export.
    in_checkpoint = load_file(result.checkpoint / "draft" / "model.safetensors")
    final = load_file(result.export_dir / "model.safetensors")
    assert in_checkpoint.keys() == final.keys()
    assert all(torch.equal(in_checkpoint[k], final[k]) for k in final)


def test_packed_rows_get_each_documents_own_target_features(base: TrainConfig) -> None:
    trainer = Trainer(dataclasses.replace(base, output_dir=base.output_dir + "-packed"))
    examples: list[Example] = list(trainer.data.rows[:3])  # type: ignore[arg-type]
    (packed,) = pack_examples(examples, max_length=sum(len(e) for e in examples))
    features = batch_target_features(trainer.target, Collator()([packed]), trainer.layer_ids)
    start = 0
    for example in examples:
        alone = capture_target_features(trainer.target, torch.tensor([example.input_ids]), trainer.layer_ids)
        end = start + len(example)
        torch.testing.assert_close(features.features[0, start:end], alone.features[0], rtol=1e-4, atol=1e-5)
        start = end


def test_bf16_autocast_trains_and_exports_in_the_targets_dtype(base: TrainConfig) -> None:
    trainer = Trainer(dataclasses.replace(base, precision="bf16", max_steps=2))
    result = trainer.train()
    assert result.export_dir is not None
    weights = load_file(result.export_dir / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.draft.parameters())  # fp32 master weights
