"""``dspark generate`` on a tiny local target/draft pair: text and JSON output, prompts files, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.cli import main
from dspark_core.cli.generate import Prompt, read_prompts
from dspark_qwen3.modeling import Qwen3DSparkModel
from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target


def build_draft(target_dir: Path, out: Path, **options: object) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    draft = Qwen3DSparkModel.from_target(
        target,
        num_draft_layers=1,
        block_size=4,
        mask_token_id=tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN),
        markov_rank=16,
        target_layer_ids=[0],
        **options,
    )
    draft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    target = make_tiny_target(root / "target", hidden_size=32, num_layers=2)
    return target, build_draft(target, root / "draft")


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_with_baseline(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    target, draft = pair
    code, out, err = generate(
        capsys, "--target", target, "--draft", draft, "--prompt", "What is 3 plus 4?",
        "--max-new-tokens", "12", "--baseline", "--json",
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    (result,) = payload["results"]
    assert result["prompt"] == "What is 3 plus 4?"
    assert result["baseline_matches"] is True
    assert result["token_ids"] == result["baseline"]["token_ids"]
    assert isinstance(result["text"], str)
    metrics = result["metrics"]
    assert metrics["new_tokens"] == len(result["token_ids"])
    assert metrics["new_tokens"] == 12 or metrics["stop_reason"] == "eos"
    assert metrics["target_forwards"] == metrics["rounds"] + 1
    summary = payload["summary"]
    assert summary["speculative"]["rounds"] == metrics["rounds"]
    assert summary["baseline"]["new_tokens"] == metrics["new_tokens"]
    assert summary["speedup_pooled"] is not None and summary["speedup_median"] is not None
    assert summary["speculative"]["tau_pooled"] >= 1.0 and "bonus" in summary["definitions"]["tau_pooled"]
    assert payload["settings"]["schedule"] == "off" and payload["settings"]["proposal_length"] == 4

    # The chat template wrapped the prompt, as the tokenizer would for a chat.
    tokenizer = AutoTokenizer.from_pretrained(target)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False, add_generation_prompt=True
    )
    assert result["prompt_tokens"] == len(tokenizer(chat, add_special_tokens=False)["input_ids"])


def test_text_output_and_progress_bar(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["Hello there", "ignored"]}\n\n{"turns": ["The quick brown fox"]}\n')
    code, out, err = generate(
        capsys, "--target", target, "--draft", draft, "--prompts", prompts, "--max-new-tokens", "6",
        "--temperature", "0.9", "--top-p", "0.95", "--seed", "3", "--schedule", "position:0.2", "--baseline",
    )  # fmt: skip
    assert code == 0, err
    assert "[1/2] 'Hello there'" in out and "[2/2] 'The quick brown fox'" in out
    rows = ("tau_pooled (tokens/verify round)", "accept_rate@k, k=0..", "draft time (s)", "tokens/s")
    for row in (*rows, "speedup_pooled", "speedup_median (min-max)", "the bonus token counted"):
        assert row in out
    assert "prompts" in err  # the tqdm bar goes to stderr


def test_sampling_is_reproducible_with_a_seed(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft = pair
    args = ("--target", target, "--draft", draft, "--prompt", "Hi", "--max-new-tokens", "8", "--json")
    runs = [
        json.loads(generate(capsys, *args, "--temperature", "1.0", "--seed", "5")[1])["results"][0][
            "token_ids"
        ]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_draft_saved_without_target_weights(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft_dir = pair
    draft = Qwen3DSparkModel.from_pretrained(draft_dir)
    draft.save_pretrained(tmp_path / "serving", include_target_weights=False)
    args = ("--target", target, "--prompt", "Hi", "--max-new-tokens", "6", "--json")
    full = json.loads(generate(capsys, *args, "--draft", draft_dir)[1])
    code, out, err = generate(capsys, *args, "--draft", tmp_path / "serving")
    assert code == 0, err
    assert json.loads(out)["results"][0]["token_ids"] == full["results"][0]["token_ids"]


def test_draft_of_another_target_is_refused(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = pair
    other = make_tiny_target(tmp_path / "other", hidden_size=32, num_layers=2, seed=1)
    foreign = build_draft(other, tmp_path / "foreign")
    code, _, err = generate(capsys, "--target", target, "--draft", foreign, "--prompt", "Hi")
    assert code == 1
    assert "dspark generate: error:" in err and "differs from the target" in err


def test_target_without_tokenizer_takes_token_ids(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target_dir, draft = pair
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(target_dir).save_pretrained(bare)
    code, out, err = generate(
        capsys, "--target", bare, "--draft", draft, "--prompt", "5 17 42", "--max-new-tokens", "5", "--json"
    )
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["text"] is None and result["prompt_tokens"] == 3 and len(result["token_ids"]) >= 1
    code, _, err = generate(capsys, "--target", bare, "--draft", draft, "--prompt", "hello")
    assert code == 1 and "token ids" in err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--temperature", "-1"), "temperature"),
        (("--proposal-length", "9"), "proposal_length"),
        (("--schedule", "sometimes"), "schedule"),
        (("--max-new-tokens", "0"), "max-new-tokens"),
        (("--proposal-length", "0"), "every round drafts at least one slot"),
        (("--eos-token-id", "100000"), "--eos-token-id 100000 is outside the target's vocabulary"),
        (("--dtype", "int8"), "precision must be one of"),
        (("--exact", "--dtype", "bf16"), "--exact runs in fp32"),
        (("--plot", "out.svg"), "give a .png file name"),
    ],
)
def test_bad_arguments_are_reported(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], args: tuple[str, ...], match: str
) -> None:
    target, draft = pair
    code, _, err = generate(capsys, "--target", target, "--draft", draft, "--prompt", "Hi", *args)
    assert code == 1 and match in err


def test_malformed_prompts_file_names_the_line(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft = pair
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"turns": ["fine"]}\n{"turns": "not a list"}\n')
    code, _, err = generate(capsys, "--target", target, "--draft", draft, "--prompts", prompts)
    assert code == 1 and f"{prompts}:2" in err


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ('{"turns": ["a"]}\n{oops\n', 2, "not valid JSON"),
        ('\n\n{"prompt": "a"}\n', 3, "turns"),
        ('{"turns": []}\n', 1, "at least one turn"),
        ('{"turns": ["a", 3]}\n', 1, "turns"),
        ('["a"]\n', 1, "turns"),
    ],
)
def test_read_prompts_errors(tmp_path: Path, text: str, line: int, match: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_prompts(path)
    assert f"{path}:{line}:" in str(info.value)


def test_read_prompts_takes_the_first_turn(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"turns": ["first", "second"], "id": 1}\n\n{"turns": ["only"]}\n')
    assert read_prompts(path) == [Prompt("first", f"{path}:1"), Prompt("only", f"{path}:3")]
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)


def test_console_script_runs_and_imports_no_torch_for_help(pair: tuple[Path, Path]) -> None:
    target, draft = pair
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = (
        "import sys\nfrom dspark_core.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run(
        [sys.executable, "-m", "dspark_core.cli", "generate", "--target", str(target), "--draft", str(draft),
         "--prompt", "Hello", "--max-new-tokens", "4", "--json"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["speculative"]["new_tokens"] >= 1
    assert "deprecated" not in result.stderr.lower()


def test_baseline_match_and_plot_in_text_output(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft = pair
    plot = tmp_path / "acceptance.png"
    code, out, err = generate(
        capsys, "--target", target, "--draft", draft, "--prompt", "What is 3 plus 4?",
        "--max-new-tokens", "12", "--baseline", "--exact", "--plot", plot,
    )  # fmt: skip
    assert code == 0, err
    assert "identical to plain greedy" in out
    assert "note: greedy outputs identical to plain decoding: 1/1" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_run_says_greedy_may_differ(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    target, draft = pair
    code, out, err = generate(
        capsys, "--target", target, "--draft", draft, "--prompt", "Hi", "--max-new-tokens", "4",
        "--dtype", "bf16", "--json",
    )  # fmt: skip
    assert code == 0, err
    note = json.loads(out)["summary"]["note"]
    assert "bfloat16 greedy output may differ" in note and "--exact" in note
