"""Every bad input to the CLI is one line on stderr, exit code 1, naming the file, field or limit at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_core import resolve_dspark_draft_spec
from dspark_core.cli import describe_error
from dspark_core.cli import main as cli_main
from dspark_qwen3.testing import make_tiny_target


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("errors") / "target", num_layers=2)


@pytest.fixture(scope="module")
def draft_dir(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    spec = resolve_dspark_draft_spec(list(target.config.architectures))
    torch.manual_seed(0)
    draft = spec.build_draft(target, mask_token_id=5, num_draft_layers=1, block_size=4, target_layer_ids=[0])
    path = tmp_path_factory.mktemp("errors-draft") / "draft"
    draft.save_pretrained(path)
    return path


def chat_file(path: Path, rows: int = 4) -> Path:
    record = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(rows)))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert cli_main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dspark ")]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def train_argv(target: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--target",
        str(target),
        "--data",
        str(data),
        "--output",
        str(output),
        "--no-progress",
        *extra,
    ]


def test_a_bare_string_architectures_is_named(
    target_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "target"
    bad.mkdir()
    for item in target_dir.iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = config["architectures"][0]
    (bad / "config.json").write_text(json.dumps(config))
    data = chat_file(tmp_path / "data.jsonl")
    line = one_error_line(capsys, train_argv(bad, data, tmp_path / "run"))
    assert "config.json: `architectures` is the string 'Qwen3ForCausalLM'; write a list" in line


def test_missing_directories_say_no_such_directory(
    target_dir: Path, draft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = chat_file(tmp_path / "data.jsonl")
    line = one_error_line(capsys, train_argv(tmp_path / "nope", data, tmp_path / "run"))
    assert "target" in line and "nope: no such directory" in line
    argv = ["generate", "--target", str(target_dir), "--draft", str(tmp_path / "gone"), "--prompt", "hi"]
    line = one_error_line(capsys, argv)
    assert "--draft" in line and "gone: no such directory" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr", "1e38"], "lr 1e+38 exceeds the sanity limit 0.1; pass --ignore-limits"),
        (["--block-size", "5000"], "block_size 5000 exceeds the sanity limit 64; pass --ignore-limits"),
        (["--num-anchors", "100000"], "num_anchors 100000 exceeds the sanity limit 8192"),
        (["--max-length", "10000000"], "max_length 10000000 exceeds the sanity limit 131072"),
    ],
)
def test_values_beyond_the_sanity_limits_are_refused(
    flags: list[str], expected: str, target_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = chat_file(tmp_path / "data.jsonl")
    assert expected in one_error_line(capsys, train_argv(target_dir, data, tmp_path / "run", *flags))


def test_bad_data_files_name_the_file_and_line(
    target_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = chat_file(tmp_path / "data.jsonl")
    data.write_bytes(data.read_bytes() + b'{"messages": "\xff\xfe"}\n')
    line = one_error_line(capsys, train_argv(target_dir, data, tmp_path / "run"))
    assert f"{data}:5: not valid UTF-8 (byte 0xff at column 15)" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert str(empty) in one_error_line(capsys, train_argv(target_dir, empty, tmp_path / "run2"))


def test_a_truncated_draft_is_named(
    target_dir: Path, draft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "draft"
    broken.mkdir()
    for item in draft_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = ["generate", "--target", str(target_dir), "--draft", str(broken), "--prompt", "hi"]
    line = one_error_line(capsys, argv)
    assert f"--draft {broken}: cannot load its weights" in line and "truncated or corrupt" in line


def test_a_prompt_beyond_the_targets_positions_is_refused(
    target_dir: Path, draft_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = json.loads((target_dir / "config.json").read_text())["max_position_embeddings"]
    argv = ["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--prompt", "hi"]
    line = one_error_line(capsys, [*argv, "--max-new-tokens", str(limit)])
    assert f"plus max_new_tokens {limit} exceeds the target's max_position_embeddings {limit}" in line


def test_an_internal_error_says_so_and_asks_for_a_verbose_report() -> None:
    message = describe_error(ZeroDivisionError("division by zero"))
    assert message.startswith("internal error: ZeroDivisionError: division by zero")
    assert "--verbose" in message and "report" in message
    assert describe_error(ValueError("bad --foo")) == "error: bad --foo"
