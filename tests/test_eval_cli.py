"""``dspark eval`` end to end on the tiny random target: table, JSON, --all-turns, bad rows, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_generate import build_draft
from transformers import AutoTokenizer

from dspark_core.cli import main
from dspark_core.training.data import encode_prompt
from dspark_qwen3.testing import make_tiny_target


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    target = make_tiny_target(root / "target", hidden_size=32, num_layers=2)
    return target, build_draft(target, root / "draft")


def write(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_eval(
    capsys: pytest.CaptureFixture[str], pair: tuple[Path, Path], *args: object
) -> tuple[int, str, str]:
    target, draft = pair
    code = main(["eval", "--target", str(target), "--draft", str(draft), "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_json_with_baseline(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = write(
        tmp_path / "gsm8k.jsonl", *({"turns": [f"What is {i} plus {i}?", "unused"]} for i in range(5))
    )
    chat = write(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "Say hello."}]})
    code, out, err = run_eval(
        capsys, pair, bench, chat, "--batch-size", "2", "--max-new-tokens", "10", "--baseline",
        "--limit", "3", "--temperature", "0,1", "--json",
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    assert payload["settings"]["batch_size"] == 2 and payload["settings"]["turns"] == "first"
    greedy, sampled = payload["results"]
    assert (greedy["temperature"], sampled["temperature"]) == (0.0, 1.0)
    columns = greedy["figures"]
    assert list(columns) == ["gsm8k", "chat", "overall"]
    assert columns["gsm8k"]["prompts"] == 3 and columns["overall"]["prompts"] == 4
    # Greedy speculative decoding is lossless: every output equals plain decoding's.
    assert (columns["overall"]["identical"], columns["overall"]["compared"]) == (4, 4)
    for figures in columns.values():
        assert figures["tau_pooled"] >= 1.0 and figures["tau_mean_per_request"] >= 1.0
        assert figures["speedup_pooled"] > 0 and figures["speedup_min"] <= figures["speedup_median"]
        assert len(figures["accept_rate"]) == 4  # the draft's block size
    assert sampled["figures"]["overall"]["identical"] is None
    requests = [r for r in payload["requests"] if r["temperature"] == 0.0]
    assert [r["source"] for r in requests] == [f"{bench}:1", f"{bench}:2", f"{bench}:3", f"{chat}:1"]
    assert all(r["new_tokens"] == len(r["token_ids"]) for r in requests)

    code, out, err = run_eval(capsys, pair, bench, "--max-new-tokens", "6", "--baseline", "--batch-size", "4")
    assert code == 0, err
    header = out.splitlines()[1].split()
    assert header == ["figure", "gsm8k"]  # one dataset: no separate overall column
    for name in ("tau_pooled", "tau_mean_per_request", "accept_rate@0", "speedup_pooled", "speedup_median"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "bonus token counted" in out and "identical to plain" in out


def test_all_turns_asks_each_later_turn_after_the_models_own_answer(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = write(
        tmp_path / "mt.jsonl", {"turns": ["Hello there.", "And again?"]}, {"turns": ["One turn only."]}
    )
    code, out, err = run_eval(capsys, pair, bench, "--max-new-tokens", "5", "--all-turns", "--json")
    assert code == 0, err
    payload = json.loads(out)
    first, single, second = payload["requests"]
    assert (first["turn"], single["turn"], second["turn"]) == (0, 0, 1) and second["source"] == f"{bench}:1"
    assert payload["results"][0]["figures"]["overall"]["prompts"] == 3
    tokenizer = AutoTokenizer.from_pretrained(pair[0])
    answer = tokenizer.decode(first["token_ids"], skip_special_tokens=True)
    conversation = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And again?"},
    ]
    assert second["prompt_tokens"] == len(encode_prompt(tokenizer, conversation))

    code, out, err = run_eval(capsys, pair, bench, "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert [r["turn"] for r in json.loads(out)["requests"]] == [0, 0]


@pytest.mark.parametrize(
    "row",
    [
        {"turns": "not a list"},
        {"messages": [{"role": "user"}]},
        {"input_ids": [1, -2], "loss_mask": [0, 1]},
    ],
    ids=["deepspec", "chat", "pretokenised"],
)
def test_a_bad_row_is_one_line_naming_file_and_line(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], row: object
) -> None:
    data = write(tmp_path / "bad.jsonl", {"turns": ["fine"]}, "", row)
    code, out, err = run_eval(capsys, pair, data)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"dspark eval: error: {data}:3: ")


def test_pretokenised_prompts_and_the_plot(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    data = write(tmp_path / "ids.jsonl", {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 0, 1, 1]})
    plot = tmp_path / "acceptance.png"
    code, out, err = run_eval(capsys, pair, data, "--max-new-tokens", "4", "--plot", plot, "--json")
    assert code == 0, err
    (request,) = json.loads(out)["requests"]
    assert request["prompt_tokens"] == 3
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_compare_on_prompts_reports_the_named_figures(pair: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dspark_core.decoding.compare import compare_on_prompts
    from dspark_core.loading import load_draft

    target = AutoModelForCausalLM.from_pretrained(pair[0]).eval()
    draft = load_draft(pair[1], target)
    prompts = [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])]
    with torch.inference_mode():
        result = compare_on_prompts(target, draft, prompts, max_new_tokens=6)
    figures = result.as_dict()
    assert figures["identical"] == 2 and figures["tau_pooled"] >= 1.0 and figures["speedup_pooled"] > 0
    assert figures["speedup_min"] <= figures["speedup_median"] <= figures["speedup_max"]
    assert any("speedup_pooled" in line and "speedup_median" in line for line in result.summary_lines())
