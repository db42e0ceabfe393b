"""The figures vocabulary on constructed cases with known answers, and the evaluation file formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dspark_core.decoding import figures
from dspark_core.decoding.figures import RequestRounds
from dspark_core.evaluation.datasets import read_dataset, read_datasets
from dspark_core.evaluation.report import OVERALL, BatchTiming, EvalReport, RequestOutcome
from dspark_core.training.data import DatasetError


def rounds(committed: list[int], proposed: list[int] | None = None) -> RequestRounds:
    """Rounds that accepted ``c - 1`` draft tokens each (the bonus/correction token is the last one)."""
    proposed = proposed if proposed is not None else [4] * len(committed)
    return RequestRounds(committed, [c - 1 for c in committed], proposed)


def test_the_two_taus_differ_when_requests_of_different_lengths_accept_differently() -> None:
    # One short request that accepted everything, one long one that accepted nothing.
    short, long = rounds([5]), rounds([1, 1, 1, 1])
    assert figures.tau_pooled([short, long]) == pytest.approx(9 / 5)  # 9 tokens over 5 rounds
    assert figures.tau_mean_per_request([short, long]) == pytest.approx((5 + 1) / 2)


def test_the_two_taus_agree_when_every_request_has_as_many_rounds() -> None:
    requests = [rounds([5, 3]), rounds([1, 2])]
    assert figures.tau_pooled(requests) == pytest.approx(11 / 4)
    assert figures.tau_mean_per_request(requests) == pytest.approx(11 / 4)


def test_plain_decoding_has_tau_one_because_the_bonus_token_is_counted() -> None:
    plain = RequestRounds([1, 1, 1], [0, 0, 0], [0, 0, 0])
    assert figures.tau_pooled([plain]) == figures.tau_mean_per_request([plain]) == 1.0
    assert figures.accept_rates([plain]) == []
    assert figures.tokens_per_target_forward(3, 4) == pytest.approx(0.75)  # the prefill is a forward


def test_accept_rate_is_conditional_on_the_proposal_length() -> None:
    request = RequestRounds([5, 2, 1], [4, 1, 0], [4, 4, 2])
    assert figures.accept_rates([request]) == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert figures.mean_proposal_length([request]) == pytest.approx(10 / 3)
    assert figures.accept_rates([RequestRounds([1], [0], [1]), RequestRounds([], [], [])]) == [0.0]


def test_pooled_and_median_speedups_differ_on_unequal_units() -> None:
    # One long batch twice as fast, two short ones no faster.
    spec_tokens, spec_s, plain_tokens, plain_s = (
        [100, 10, 10],
        [1.0, 1.0, 1.0],
        [100, 10, 10],
        [2.0, 1.0, 1.0],
    )
    assert figures.speedup_pooled(spec_tokens, spec_s, plain_tokens, plain_s) == pytest.approx(4 / 3)
    assert figures.speedup_median([2.0, 1.0, 1.0]) == (1.0, 1.0, 2.0)
    assert all(math.isnan(v) for v in figures.speedup_median([float("nan")]))


def test_every_reported_name_has_a_definition() -> None:
    for name in (
        "tau_pooled", "tau_mean_per_request", "tokens_per_target_forward", "tau_proxy", "speedup_pooled",
        "speedup_median", "accept_rate@k", "mean_proposal_length",
    ):  # fmt: skip
        assert figures.DEFINITIONS[name]
    assert (
        "bonus" in figures.DEFINITIONS["tau_pooled"]
        and "bonus" in figures.DEFINITIONS["tau_mean_per_request"]
    )


def outcome(dataset: str, committed: list[int], identical: bool | None = True) -> RequestOutcome:
    return RequestOutcome(
        dataset=dataset, source=f"{dataset}.jsonl:1", turn=0, temperature=0.0, rounds=rounds(committed),
        prompt_tokens=3, new_tokens=sum(committed), target_forwards=len(committed) + 1,
        token_ids=tuple(range(sum(committed))), identical=identical,
    )  # fmt: skip


def test_report_columns_pool_per_dataset_and_overall() -> None:
    report = EvalReport(settings={"batch_size": 1, "max_new_tokens": 8, "turns": "first", "schedule": "off"})
    report.requests += [outcome("a", [5]), outcome("b", [1, 1, 1, 1], identical=False)]
    report.batches += [BatchTiming("a", 0.0, 1, 5, 1.0, 5, 2.0), BatchTiming("b", 0.0, 1, 4, 1.0, 4, 1.0)]
    a, overall = report.figures(0.0, "a"), report.figures(0.0, OVERALL)
    assert a["tau_pooled"] == 5.0 and a["speedup_pooled"] == pytest.approx(2.0) and a["identical"] == 1
    assert overall["tau_pooled"] == pytest.approx(9 / 5) and overall["tau_mean_per_request"] == pytest.approx(
        3.0
    )
    assert overall["speedup_pooled"] == pytest.approx((9 / 2) / (9 / 3))
    assert overall["speedup_median"] == pytest.approx(1.5) and (
        overall["identical"],
        overall["compared"],
    ) == (1, 2)
    text = "\n".join(report.table_lines())
    assert text.splitlines()[1].split() == ["figure", "a", "b", OVERALL]
    assert "bonus token counted" in text and "speedup_median" in text
    identical_row = next(line for line in text.splitlines() if line.startswith("identical to plain"))
    assert identical_row.split()[-3:] == ["1/1", "0/1", "1/2"]
    payload = json.loads(json.dumps(report.as_dict()))
    assert payload["results"][0]["figures"]["b"]["tau_pooled"] == 1.0
    assert payload["definitions"] == figures.DEFINITIONS


def write(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_deepspec_chat_and_pretokenised_rows(tmp_path: Path) -> None:
    bench = write(
        tmp_path / "mt_bench.jsonl", {"turns": ["first", "second"], "question_id": 81}, "", {"turns": ["x"]}
    )
    (one, two) = read_dataset(bench).conversations
    assert one.turns == ((("user", "first"),), (("user", "second"),)) and one.source == f"{bench}:1"
    assert two.source == f"{bench}:3" and two.num_turns == 1
    chat = write(
        tmp_path / "chat.jsonl",
        {"conversations": [
            {"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "dataset answer, not used"}, {"from": "human", "value": "q2"},
        ]},
    )  # fmt: skip
    (conversation,) = read_dataset(chat).conversations
    assert conversation.turns == ((("system", "be brief"), ("user", "q1")), (("user", "q2"),))
    tokens = write(tmp_path / "tok.jsonl", {"input_ids": [7, 8, 9, 10], "loss_mask": [0, 0, 1, 1]})
    assert read_dataset(tokens).conversations[0].prompt_ids == (7, 8)
    assert [len(d.conversations) for d in read_datasets([bench, chat], limit=1)] == [1, 1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"turns": []}, '"turns" must be a non-empty list'),
        ({"turns": ["ok", 3]}, '"turns" must be a non-empty list'),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "assistant", "content": "only an answer"}]}, "no user turn"),
        ({"input_ids": [1, 2], "loss_mask": [1, 1]}, "has no prompt"),
        ({"input_ids": [1, 2], "loss_mask": [0]}, "'loss_mask' has 1"),
        ({"prompt": "unknown schema"}, "a DeepSpec benchmark row"),
        ("{not json", "invalid JSON"),
    ],
)
def test_a_bad_row_is_named_by_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    path = write(tmp_path / "data.jsonl", {"turns": ["fine"]}, row)
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_the_figures_and_the_report_import_no_torch() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, dspark_core.decoding.figures, dspark_core.evaluation.report, dspark_core.cli.eval\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
