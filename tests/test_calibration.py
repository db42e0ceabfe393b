"""Calibration of the confidence head: metrics by hand, the STS fit on synthetic data, ``sts.json`` in
SGLang's schema, the cost table's cache, check-draft's calibration lines and ``dspark calibrate``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from dspark_core.calibration.calibrate import calibrate_records, write_calibration
from dspark_core.calibration.files import REPORT_FILE, STS_FILE, StsFile, read_sts, write_sts
from dspark_core.calibration.metrics import auroc, brier_score, expected_calibration_error, position_figures
from dspark_core.calibration.records import CalibrationRecords, RoundSample
from dspark_core.calibration.sts import fit_sts
from dspark_core.cli import main
from dspark_core.decoding import ConfidenceSchedule, RoundRecord, speculative_generate
from dspark_core.decoding.costs import cost_table_path, load_or_profile_costs, prepare_cost_schedule
from dspark_core.errors import CalibrationError
from dspark_qwen3.modeling import Qwen3DSparkModel
from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target

# -- metrics by hand --------------------------------------------------------------------------


def test_ece_brier_auroc_by_hand() -> None:
    probs, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # Two bins: [0, 0.5) holds 0.1, 0.4, 0.35 (mean 0.2833, rate 1/3); [0.5, 1] holds 0.8 (rate 1).
    # ECE = 3/4 * |0.28333 - 0.33333| + 1/4 * |0.8 - 1| = 0.0375 + 0.05.
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.0875)
    # Ten bins: each sample alone in its bin: mean |p - y| = (0.1 + 0.4 + 0.65 + 0.2) / 4.
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.3375)
    assert brier_score(probs, labels) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # Positive-negative pairs ranked right: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4) of 4.
    assert auroc(probs, labels) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.2], [0, 1, 0]) == pytest.approx(0.75)  # a tie counts one half
    assert auroc([0.3, 0.6], [1, 1]) is None
    assert math.isnan(expected_calibration_error([], []))
    # p = 1 lands in the last bin, not past it.
    assert expected_calibration_error([1.0, 1.0], [1, 1], bins=4) == 0.0


def test_position_figures_of_the_running_product_by_hand() -> None:
    logit = math.log  # logit(p) = log(p / (1 - p)); these logits give sigmoids 0.8, 0.5, 0.25
    records = CalibrationRecords(block_size=3)
    records.extend(
        [
            RoundSample((logit(4.0), logit(1.0), logit(1 / 3)), accepted=3),
            RoundSample((logit(4.0), logit(1.0)), accepted=0),
            RoundSample((logit(1.0),), accepted=1),
        ]
    )
    figures = position_figures(records, [1.0, 1.0, 1.0], bins=10)
    # Position 0: predictions 0.8, 0.8, 0.5 against 1, 0, 1.
    assert figures[0].samples == 3
    assert figures[0].brier == pytest.approx((0.04 + 0.64 + 0.25) / 3)
    assert figures[0].ece == pytest.approx((abs(1.6 - 1) + abs(0.5 - 1)) / 3)
    assert figures[0].auroc == pytest.approx(0.25)  # 0.8 vs 0.8 ties (1/2), 0.5 < 0.8 (0)
    # Position 1: running products 0.4, 0.4 against 1, 0 (the third round verified one slot).
    assert figures[1].samples == 2 and figures[1].ece == pytest.approx(0.1)
    # Position 2: 0.1 against 1; a temperature of 2 on slot 2 gives 0.4 * sigmoid(log(1/3) / 2).
    assert figures[2].samples == 1 and figures[2].ece == pytest.approx(0.9)
    scaled = position_figures(records, [1.0, 1.0, 2.0], bins=10)
    expected = 0.4 / (1 + math.sqrt(3))
    assert scaled[2].mean_predicted == pytest.approx(expected)


def test_records_from_rounds() -> None:
    def record(proposed: int, accepted: int, confidence: tuple[float, ...]) -> RoundRecord:
        return RoundRecord(
            0, 5, len(confidence), proposed, accepted, (1,) * (accepted + 1), 1, 6, 5, 1, confidence
        )

    records = CalibrationRecords(block_size=4)
    records.add_round(record(3, 1, (0.5, 0.2, -0.1)))
    records.add_round(record(0, 0, ()))  # the budget's last round: nothing drafted, nothing learnt
    assert records.samples == [RoundSample((0.5, 0.2, -0.1), 1)]
    with pytest.raises(ValueError, match="schedule 'off'"):
        records.add_round(record(2, 1, (0.5, 0.2, -0.1)))


# -- the STS fit ------------------------------------------------------------------------------


def synthetic_records(temperatures: list[float], rounds: int, seed: int) -> CalibrationRecords:
    """Rounds whose slot k is accepted (given the earlier ones) with probability sigmoid(c_k / T_k):
    the head's raw logits c are miscalibrated by exactly ``temperatures``."""
    rng = random.Random(seed)
    records = CalibrationRecords(block_size=len(temperatures))
    for _ in range(rounds):
        logits = tuple(rng.gauss(1.0, 2.5) for _ in temperatures)
        accepted = 0
        for logit, temperature in zip(logits, temperatures, strict=True):
            if rng.random() >= 1 / (1 + math.exp(-logit / temperature)):
                break
            accepted += 1
        records.extend([RoundSample(logits, accepted)])
    return records


def test_sts_fit_recovers_known_temperatures() -> None:
    truth = [0.5, 2.0, 1.0, 3.0]
    records = synthetic_records(truth, rounds=20_000, seed=0)
    fit = fit_sts(records)
    for fitted, true in zip(fit.temperatures, truth, strict=True):
        assert fitted == pytest.approx(true, rel=0.2)
    assert fit.samples == (20_000,) * 4
    # Calibrated, the running product's ECE is small; raw, it is not.
    assert max(fit.ece_after) < 0.02
    assert fit.ece_before[0] > 0.05
    assert all(a <= b for a, b in zip(fit.ece_after, fit.ece_before, strict=True))
    # The fitted temperatures reproduce the reported ECE.
    after = position_figures(records, fit.temperatures)
    assert [f.ece for f in after] == pytest.approx(list(fit.ece_after))


def test_sts_fit_keeps_one_where_there_is_nothing_to_fit() -> None:
    records = CalibrationRecords(block_size=3)
    records.extend([RoundSample((2.0,), 1), RoundSample((-1.0,), 0)] * 10)
    fit = fit_sts(records)
    assert fit.temperatures[1:] == (1.0, 1.0) and fit.samples == (20, 0, 0)
    assert math.isnan(fit.ece_after[1])


# -- sts.json in SGLang's schema ---------------------------------------------------------------


def read_as_sglang(path: Path, gamma: int) -> dict[str, Any]:
    """A reader written from SGLang 0.5.23's ``DSparkStsCalibration`` (dspark_sts.py) and planner:
    strict JSON; ``temperatures`` a non-empty list of numbers, each > 0, as many as the runtime gamma;
    ``dataset`` str, ``num_samples`` int, ``ece_before``/``ece_after`` lists of numbers, all optional."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    assert isinstance(data, dict)
    assert set(data) <= {"temperatures", "dataset", "num_samples", "ece_before", "ece_after"}
    number = (int, float)
    temps = data["temperatures"]
    assert (
        isinstance(temps, list)
        and temps
        and all(isinstance(t, number) and not isinstance(t, bool) for t in temps)
    )
    assert all(t > 0 for t in temps) and len(temps) == gamma
    assert isinstance(data.get("dataset", ""), str)
    assert type(data.get("num_samples", 0)) is int
    for name in ("ece_before", "ece_after"):
        assert all(isinstance(v, number) and not isinstance(v, bool) for v in data.get(name, []))
    return data


def test_sts_file_round_trips_through_sglangs_schema(tmp_path: Path) -> None:
    records = synthetic_records([0.5, 2.0, 1.0], rounds=3000, seed=1)
    # A fourth position nobody reached: its ECE is NaN, which JSON cannot hold.
    records.block_size = 4
    calibration = calibrate_records(records)
    draft_dir = tmp_path / "draft"
    draft_dir.mkdir()
    save_file({"w": torch.zeros(2)}, draft_dir / "model.safetensors")
    sts_path, report_path = write_calibration(
        draft_dir,
        calibration,
        dataset="heldout.jsonl",
        draft_dir=draft_dir,
        data_fingerprint="f",
        settings={},
    )
    data = read_as_sglang(sts_path, gamma=4)
    assert data["temperatures"] == list(calibration.fit.temperatures)
    assert data["num_samples"] == 3000 and data["dataset"] == "heldout.jsonl"
    assert data["ece_after"][3] == 0.0 and len(data["ece_before"]) == 4
    back = read_sts(sts_path, block_size=4)
    assert back.temperatures == calibration.fit.temperatures and back.num_samples == 3000
    report = json.loads(report_path.read_text())
    assert report["positions"][3]["after"]["samples"] == 0 and report["positions"][3]["after"]["ece"] is None
    assert "disjoint" in report["note"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"temperatures": []}, "non-empty list"),
        ({"temperatures": [1.0, 0.0]}, "> 0"),
        ({"temperatures": [1.0, "2"]}, "list of numbers"),
        ({"temperatures": [1.0, 1.0], "num_samples": 2.5}, "num_samples"),
        ({"temperatures": [1.0, 1.0], "dataset": 3}, "dataset"),
        ({"temperatures": [1.0, 1.0], "ece_after": [None]}, "ece_after"),
        ({"temperatures": [1.0, 1.0, 1.0]}, "block_size 2"),
    ],
)
def test_bad_sts_files_are_named(tmp_path: Path, content: dict[str, Any], match: str) -> None:
    path = tmp_path / STS_FILE
    path.write_text(json.dumps(content))
    with pytest.raises(CalibrationError, match=match) as caught:
        read_sts(path, block_size=2)
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError):
        StsFile(temperatures=(1.0, -1.0))
    write_sts(path, StsFile((1.0, 2.0)))
    assert read_as_sglang(path, gamma=2)["temperatures"] == [1.0, 2.0]


# -- cost table -------------------------------------------------------------------------------


def tiny_pair() -> tuple[Qwen3ForCausalLM, Qwen3DSparkModel]:
    config = Qwen3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(config).eval()
    draft = Qwen3DSparkModel.from_target(
        target, num_draft_layers=1, block_size=3, mask_token_id=31, markov_rank=8, target_layer_ids=[0]
    ).eval()
    return target, draft


def test_cost_table_is_reused_while_its_key_matches_and_refreshed_when_not(tmp_path: Path) -> None:
    target, draft = tiny_pair()
    options: dict[str, Any] = {"cache_dir": tmp_path, "context_tokens": 16, "repeats": 2}
    first, reused = load_or_profile_costs(target, draft, **options)
    assert not reused and len(first.verify_s) == 4 and all(t > 0 for t in first.round_seconds())
    path = cost_table_path(tmp_path, first.key)
    assert json.loads(path.read_text())["key"]["dtype"] == "float32/float32"

    again, reused = load_or_profile_costs(target, draft, **options)
    assert reused and again == first

    # Another dtype is another key: profiled again, and the file now holds the new table.
    draft64 = draft.to(torch.float64)
    other, reused = load_or_profile_costs(target, draft64, **options)
    assert not reused and other.key.dtype == "float32/float64" and other.key != first.key
    assert cost_table_path(tmp_path, other.key) == path
    assert json.loads(path.read_text())["key"]["dtype"] == "float32/float64"
    draft.to(torch.float32)

    # Another batch size too, and an unreadable file is profiled again rather than trusted.
    batched, reused = load_or_profile_costs(target, draft, batch_size=2, **options)
    assert not reused and batched.key.batch_size == 2
    path.write_text("{not json")
    _, reused = load_or_profile_costs(target, draft, **options)
    assert not reused


def test_cost_schedule_prepared_from_a_draft_folder(tmp_path: Path) -> None:
    target, draft = tiny_pair()
    folder = tmp_path / "draft"
    folder.mkdir()
    write_sts(folder / STS_FILE, StsFile((0.5, 1.5, 2.0)))
    options: dict[str, Any] = {"cache_dir": tmp_path, "context_tokens": 16, "repeats": 2}
    schedule, info = prepare_cost_schedule(
        ConfidenceSchedule("cost"), target, draft, draft_dir=folder, **options
    )
    assert schedule.temperatures == (0.5, 1.5, 2.0) and len(schedule.round_seconds) == 4
    assert info["calibration"] == str(folder / STS_FILE) and info["cost_table"]["reused"] is False
    ids = torch.tensor([[1, 2, 3, 4]])
    result = speculative_generate(target, draft, ids, max_new_tokens=10, schedule=schedule, eos_token_id=[])
    assert result.metrics.new_tokens == 10
    # Other schedules pass through untouched.
    plain = ConfidenceSchedule("product", 0.3)
    assert prepare_cost_schedule(plain, target, draft, draft_dir=folder) == (plain, {})
    with pytest.warns(UserWarning, match="uncalibrated"):
        prepare_cost_schedule(ConfidenceSchedule("cost"), target, draft, draft_dir=tmp_path, **options)


# -- check-draft and dspark calibrate on a saved draft ------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("calibrate")
    target_dir = make_tiny_target(root / "target", hidden_size=32, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    draft = Qwen3DSparkModel.from_target(
        target,
        num_draft_layers=1,
        block_size=4,
        mask_token_id=tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN),
        markov_rank=16,
        target_layer_ids=[0],
        enable_confidence_head=True,
        confidence_head_with_markov=True,
    )
    draft.save_pretrained(root / "draft")
    data = root / "heldout.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {n} please."},
                {"role": "assistant", "content": "1"},
            ]
        }
        for n in range(3, 9)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target_dir, root / "draft", data


def test_calibrate_then_check_draft(
    pair: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target, draft, data = pair
    code = main(
        ["calibrate", "--target", str(target), "--draft", str(draft), "--data", str(data),
         "--max-new-tokens", "24", "--temperature", "0", "1"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "disjoint" in out and "ECE before -> after" in out
    data_json = read_as_sglang(draft / STS_FILE, gamma=4)
    report = json.loads((draft / REPORT_FILE).read_text())
    assert report["rounds"] == data_json["num_samples"] > 0
    assert report["settings"]["temperatures"] == [0.0, 1.0] and len(report["positions"]) == 4

    assert main(["check-draft", str(draft)]) == 0
    out = capsys.readouterr().out
    assert "calibration: ok" in out
    assert f"--speculative-dspark-confidence-sts-path {(draft / STS_FILE).resolve()}" in out
    assert "SGLANG_RAGGED_VERIFY_MODE=compact" in out
    assert '"enable_adaptive_verification": true' in out

    # The draft's weights change (retrained, say): the calibration is stale.
    weights = draft / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "confidence_head" in k)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert main(["check-draft", str(draft), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["calibration"]
    assert status["state"] == "stale" and status["sglang_command"] is None
    assert any("STALE" in line for line in status["lines"])


def test_check_draft_without_calibration(
    pair: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, draft, _ = pair
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((draft / name).read_bytes())
    assert main(["check-draft", str(bare)]) == 0
    out = capsys.readouterr().out
    assert "calibration: none" in out and "sts-path" not in out


def test_calibrate_errors_are_one_line(
    pair: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target, draft, _ = pair
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}) + "\n")
    code = main(
        [
            "calibrate",
            "--target",
            str(target),
            "--draft",
            str(draft),
            "--data",
            str(bad),
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "chat rows" in err and f"{bad}:1" in err and len(err.strip().splitlines()) == 1
    code = main(
        ["calibrate", "--target", str(target), "--draft", str(draft), "--data", str(tmp_path / "none.jsonl")]
    )
    assert code == 1 and "no such file" in capsys.readouterr().err


def test_generate_with_the_cost_schedule(
    pair: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, draft, _ = pair
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    args = ["generate", "--target", str(target), "--draft", str(draft), "--prompt", "Count to five.",
            "--max-new-tokens", "16", "--schedule", "cost", "--baseline", "--json"]  # fmt: skip
    for reused in (False, True):
        assert main(args) == 0
        payload = json.loads(capsys.readouterr().out)
        info = payload["settings"]["schedule_info"]
        assert payload["settings"]["schedule"] == "cost"
        assert info["cost_table"]["reused"] is reused and len(info["cost_table"]["verify_s"]) == 5
        assert payload["summary"]["baseline_matches"] == {"identical": 1, "compared": 1}


def test_cost_schedule_in_batched_decoding_keeps_greedy_exact(tmp_path: Path) -> None:
    from dspark_core.decoding.batched import plain_generate_batch, speculative_generate_batch

    target, draft = tiny_pair()
    folder = tmp_path / "draft"
    folder.mkdir()
    write_sts(folder / STS_FILE, StsFile((0.5, 1.5, 2.0)))
    schedule, info = prepare_cost_schedule(
        ConfidenceSchedule("cost"), target, draft, draft_dir=folder, batch_size=3, cache_dir=tmp_path,
        context_tokens=16, repeats=2,
    )  # fmt: skip
    assert info["cost_table"]["key"]["batch_size"] == 3
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    options: dict[str, Any] = {"max_new_tokens": 14, "eos_token_id": []}
    spec = speculative_generate_batch(target, draft, prompts, schedule=schedule, **options)
    plain = plain_generate_batch(target, prompts, **options)
    assert [r.new_tokens for r in spec] == [r.new_tokens for r in plain]
