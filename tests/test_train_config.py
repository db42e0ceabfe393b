"""The training config (files, flags, validation, resume compatibility), the schedule and the mask token."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from dspark_core.cli import main as cli_main
from dspark_core.training.config import RUN_CONTROL_FIELDS, ConfigError, TrainConfig
from dspark_core.training.optim import WarmupCosine
from dspark_qwen3.testing import TINY_MASK_TOKEN


def printed_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert cli_main(["train", *argv, "--print-config"]) == 0
    config: dict[str, Any] = json.loads(capsys.readouterr().out)
    return config


def test_yaml_and_toml_files_with_flag_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "target: ./t\ndata: [a.jsonl, b.jsonl]\nlr: 3.0e-4\nbatch-size: 4\ntarget_layer_ids: [1, 3]\n"
        "loss_decay_gamma: null\npack: true\nchat_template_kwargs: {enable_thinking: false}\n"
    )
    config = printed_config(
        capsys, "--config", str(yaml_file), "--lr", "1e-3", "--output", "out", "--no-pack"
    )
    assert config["lr"] == 1e-3  # the flag wins
    assert config["batch_size"] == 4 and config["data"] == ["a.jsonl", "b.jsonl"]
    assert config["draft"]["target_layer_ids"] == [1, 3] and config["loss"]["decay_gamma"] is None
    assert config["pack"] is False and config["output_dir"] == "out"
    assert config["chat_template_kwargs"] == {"enable_thinking": False}

    toml_file = tmp_path / "run.toml"
    toml_file.write_text('target = "./t"\ndata = ["x.jsonl"]\nmax_steps = 7\nprecision = "fp32"\n')
    config = printed_config(
        capsys, "--config", str(toml_file), "--target-layer-ids", "0,2", "--loss-decay-gamma", "none"
    )
    assert config["max_steps"] == 7 and config["precision"] == "fp32"
    assert config["draft"]["target_layer_ids"] == [0, 2] and config["loss"]["decay_gamma"] is None


def test_bad_options_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"unknown training option 'learning_rate'"):
        TrainConfig.from_mapping({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        TrainConfig.from_mapping({"batch_sise": 2})
    with pytest.raises(ConfigError, match=r"option 'max_steps': expected an integer"):
        TrainConfig.from_mapping({"max_steps": 2.5})
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        TrainConfig.from_mapping({"resume": True, "overwrite": True})
    with pytest.raises(ConfigError, match="eval_every needs eval_data"):
        TrainConfig.from_mapping({"eval_every": 5})
    with pytest.raises(ConfigError, match="parallelism must be one of ddp, fsdp"):
        TrainConfig.from_mapping({"parallelism": "zero3"})
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainConfig.from_file(bad_file)
    # Through the CLI: a clear message and exit code 1.
    assert cli_main(["train", "--data", "x.jsonl"]) == 1
    assert "target is required" in capsys.readouterr().err


def test_incompatibilities_list_learning_fields_only() -> None:
    base = TrainConfig.from_mapping({"target": "t", "data": ["d"], "output_dir": "o"})
    changed = base.updated({"lr": 1e-3, "num_anchors": 64, "log_every": 3, "save_every": 9, "device": "cpu"})
    assert changed.incompatibilities(base) == [f"num_anchors: {base.draft.num_anchors!r} -> 64"]
    # lr may change on resume (a run stopped by a NaN continues more gently), with a logged note.
    assert changed.adjustments(base) == [f"lr: {base.lr!r} -> 0.001"]
    saved = base.to_dict()
    assert (
        changed.incompatibilities(saved | {"lr": 1e-3, "draft": saved["draft"] | {"num_anchors": 64}}) == []
    )
    # A flat config saved by an earlier version compares equal to its nested form.
    flat = {k: v for k, v in base.to_dict().items() if k not in ("draft", "loss")}
    flat |= base.to_dict()["draft"] | {"loss_decay_gamma": 4.0, "confidence_head": True}
    assert base.incompatibilities(
        flat | {k: v for k, v in base.to_dict()["loss"].items() if "weight" in k}
    ) == ["chunk_size: (absent) -> 4096"]
    assert {"log_every", "save_every", "keep_last", "resume"} <= RUN_CONTROL_FIELDS
    assert "max_steps" not in RUN_CONTROL_FIELDS  # the cosine schedule depends on it


def test_warmup_then_cosine_to_the_floor() -> None:
    schedule = WarmupCosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    factors = [schedule(step) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(0.1)
    decay = factors[4:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay


def test_mask_token_colliding_with_the_data_is_refused(tmp_path: Path) -> None:
    from dspark_core.training.data import DatasetError
    from dspark_core.training.trainer import Trainer
    from dspark_qwen3.testing import make_tiny_target

    target = make_tiny_target(tmp_path / "target", num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(target)
    data = tmp_path / "data.jsonl"
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "loss_mask": [0, 0, 1, 1, 1, 1]} for _ in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig.from_mapping(
        {
            "target": str(target),
            "data": [str(data)],
            "output_dir": str(tmp_path / "run"),
            "mask_token_id": 7,
            "num_draft_layers": 1,
            "markov_rank": 0,
            "target_layer_ids": [0],
            "batch_size": 1,
            "progress": False,
        }
    )
    with pytest.raises(DatasetError, match=r"data.jsonl:1: mask_token_id 7 occurs as a real token"):
        Trainer(config)
    # The failed start did not claim the directory: the corrected command runs there.
    assert not (tmp_path / "run" / "run.json").exists()
    fixed = config.updated({"mask_token": TINY_MASK_TOKEN, "mask_token_id": None})
    assert Trainer(fixed).draft.config.mask_token_id == tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)


def test_building_the_cli_parser_imports_no_torch() -> None:
    probe = (
        "import sys\nfrom dspark_core.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
