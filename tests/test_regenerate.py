"""``regenerate``: the target's own greedy responses replace the assistant turns, resumably."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.cli import main as cli_main
from dspark_core.datagen.regenerate import SamplingConfig, regenerate, resume_point
from dspark_core.training.data import DatasetError
from dspark_qwen3.testing import make_tiny_target

MAX_NEW = 6

ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]},
    {
        "conversations": [
            {"from": "human", "value": "Tell me about rivers."},
            {"from": "gpt", "value": "Wet."},
        ]
    },
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "No user turn here."}]},
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "one two three"},
            {"role": "user", "content": "And back?"},
            {"role": "assistant", "content": "three two one"},
        ]
    },
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple"}]},
]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("regen") / "target", num_layers=2)


@pytest.fixture(scope="module")
def target(target_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(target_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(target_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def greedy_reply(target: Any, tokenizer: Any, conversation: list[dict[str, Any]]) -> list[int]:
    """The target's greedy answer to one conversation (its ids), unbatched, through plain ``generate``."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = target.generate(
            torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return [int(t) for t in new]


def expected_messages(target: Any, tokenizer: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay the row turn by turn with unbatched greedy decoding."""
    if "messages" in row:
        turns = [dict(m) for m in row["messages"]]
    else:
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        turns = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
    if turns[-1]["role"] != "assistant":
        turns.append({"role": "assistant", "content": ""})
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            ids = greedy_reply(target, tokenizer, turns[:i])
            turn["content"] = str(tokenizer.decode(ids, skip_special_tokens=True))
            turn["response_ids"] = ids
    return turns


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_regenerated_turns_are_the_targets_greedy_outputs(
    target: Any, tokenizer: Any, input_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    stats = regenerate(
        target,
        tokenizer,
        input_file,
        output,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        batch_size=3,
        progress=False,
    )
    records = read_output(output)
    # Row 3 has no user turn: skipped and counted, not written.
    assert [r["row"] for r in records] == [0, 1, 2, 4, 5, 6]
    assert stats.rows_skipped_no_prompt == 1 and stats.rows_written == 6
    assert stats.turns_generated == 7  # row 4 has two assistant turns
    for record in records:
        row = ROWS[record["row"]]
        assert record["messages"] == expected_messages(target, tokenizer, row)
        assert record["source"] == f"{input_file}:{record['row'] + 1}"
    # The responses really are new: the dataset's own answers are gone.
    assert records[0]["messages"][1]["content"] != "5"


def test_resume_skips_rows_already_written_and_repairs_a_torn_line(
    target: Any, tokenizer: Any, input_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    first = regenerate(
        target,
        tokenizer,
        input_file,
        output,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        batch_size=2,
        limit=3,
        progress=False,
    )
    assert first.rows_written == 3
    # A run killed while writing leaves half a line behind.
    with output.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "con')
    assert resume_point(output) == 2
    code = cli_main(
        [
            "regenerate",
            "--target",
            str(Path(target.name_or_path)),
            "--input",
            str(input_file),
            "--output",
            str(output),
            "--batch-size",
            "2",
            "--max-new-tokens",
            str(MAX_NEW),
            "--no-progress",
        ]
    )
    assert code == 0
    records = read_output(output)
    assert [r["row"] for r in records] == [0, 1, 2, 4, 5, 6]
    uninterrupted = tmp_path / "whole.jsonl"
    regenerate(
        target,
        tokenizer,
        input_file,
        uninterrupted,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        batch_size=2,
        progress=False,
    )
    assert records == read_output(uninterrupted)


def test_sampled_regeneration_is_reproducible_per_seed(
    target: Any, tokenizer: Any, input_file: Path, tmp_path: Path
) -> None:
    def run(name: str, seed: int) -> list[dict[str, Any]]:
        path = tmp_path / name
        sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, seed=seed)
        regenerate(target, tokenizer, input_file, path, sampling=sampling, batch_size=4, progress=False)
        return read_output(path)

    assert run("a.jsonl", 1) == run("b.jsonl", 1)
    assert run("a.jsonl", 1) != run("c.jsonl", 2)


def test_pre_tokenised_rows_and_foreign_output_files_are_refused(
    target: Any, tokenizer: Any, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(json.dumps({"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}) + "\n")
    with pytest.raises(DatasetError, match="needs chat rows"):
        regenerate(target, tokenizer, tokens, tmp_path / "out.jsonl", progress=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "not ours"}\n')
    with pytest.raises(DatasetError, match=r"foreign.jsonl:1: not a line written by regenerate"):
        resume_point(foreign)


def test_trained_rows_are_the_targets_own_greedy_ids(
    target: Any, tokenizer: Any, input_file: Path, tmp_path: Path
) -> None:
    """The trainer's supervised tokens are the ids the target generated, not a re-tokenisation."""
    from dspark_core.training.data import TokenizedDataset, read_jsonl

    output = tmp_path / "out.jsonl"
    regenerate(
        target,
        tokenizer,
        input_file,
        output,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        batch_size=3,
        progress=False,
    )
    rows = list(read_jsonl(output))
    dataset = TokenizedDataset.from_rows(rows, tokenizer)
    records = read_output(output)
    assert len(dataset.examples) == len(records)
    for example, record in zip(dataset.examples, records, strict=True):
        turns = record["messages"]
        expected = expected_messages(target, tokenizer, ROWS[record["row"]])
        supervised = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
        assert supervised == [
            t for turn in expected if turn["role"] == "assistant" for t in turn["response_ids"]
        ]
        # Up to the first reply, the row is exactly the prompt the target answered.
        first = next(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(turns[:first], add_generation_prompt=True, return_dict=False)
        assert example.input_ids[: len(prompt)] == list(prompt)
        assert (
            example.input_ids[len(prompt) : len(prompt) + len(turns[first]["response_ids"])]
            == turns[first]["response_ids"]
        )
