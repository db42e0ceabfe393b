"""``dspark check-draft`` and the serving rules: every head type and confidence option, the feature
layers -1 and n-1, the block size, trimmed checkpoints, other families, and the one-line warning
``dspark train`` gives before its first step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from qwen3_draft_helpers import TARGET_LAYERS, make_draft, target_config

from dspark_core.cli import main
from dspark_core.modeling.draft_config import TargetLayerWarning
from dspark_core.serving import CHECKS, ENGINES, check_draft, draft_facts, serving_summary
from dspark_core.training.setup import warn_unservable
from dspark_qwen3.config import build_draft_config

LOADERS = ("dspark", "DeepSpec/NeMo", "vLLM", "SGLang")

# (markov_rank, head, confidence head, confidence with Markov) -> the loaders that can load it.
# vLLM and SGLang load only vanilla Markov heads; SGLang also needs a confidence head reading the
# Markov embedding; DeepSpec/NeMo and dspark load every variant.
HEAD_MATRIX: list[tuple[int, str, bool, bool, set[str]]] = [
    (8, "vanilla", False, False, {"dspark", "DeepSpec/NeMo", "vLLM"}),
    (8, "vanilla", True, False, {"dspark", "DeepSpec/NeMo", "vLLM"}),
    (8, "vanilla", True, True, {"dspark", "DeepSpec/NeMo", "vLLM", "SGLang"}),
    (8, "gated", False, False, {"dspark", "DeepSpec/NeMo"}),
    (8, "gated", True, False, {"dspark", "DeepSpec/NeMo"}),
    (8, "gated", True, True, {"dspark", "DeepSpec/NeMo"}),
    (8, "rnn", False, False, {"dspark", "DeepSpec/NeMo"}),
    (8, "rnn", True, False, {"dspark", "DeepSpec/NeMo"}),
    (8, "rnn", True, True, {"dspark", "DeepSpec/NeMo"}),
    (0, "vanilla", False, False, {"dspark", "DeepSpec/NeMo"}),
    (0, "vanilla", True, False, {"dspark", "DeepSpec/NeMo"}),
]


def save_draft(folder: Path, *, include_target_weights: bool = True, **options: Any) -> Path:
    make_draft(**options).save_pretrained(folder, include_target_weights=include_target_weights)
    return folder


def check(capsys: pytest.CaptureFixture[str], folder: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["check-draft", str(folder), "--json", *extra])
    payload = json.loads(capsys.readouterr().out)
    return code, payload


def verdicts(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["engine"]: v for v in payload["verdicts"]}


@pytest.mark.parametrize(
    ("rank", "head", "confidence", "with_markov", "loadable"),
    HEAD_MATRIX,
    ids=[f"r{r}-{h}-conf{int(c)}-mk{int(m)}" for r, h, c, m, _ in HEAD_MATRIX],
)
def test_every_head_type_and_confidence_option(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    rank: int,
    head: str,
    confidence: bool,
    with_markov: bool,
    loadable: set[str],
) -> None:
    folder = save_draft(
        tmp_path / "draft",
        markov_rank=rank,
        markov_head_type=head,
        enable_confidence_head=confidence,
        confidence_head_with_markov=with_markov,
    )
    code, payload = check(capsys, folder)
    assert code == 0
    got = verdicts(payload)
    assert list(got) == list(LOADERS)
    assert {name for name, v in got.items() if v["ok"]} == loadable
    for name, verdict in got.items():
        assert bool(verdict["reasons"]) == (name not in loadable), name
    if head != "vanilla" and rank > 0:
        assert f"markov_head_type {head!r}" in got["vLLM"]["reasons"][0]
        assert "qwen3_dspark.py @" in got["vLLM"]["reasons"][0]  # the rule cites its source
    if rank == 0:
        assert any("markov_rank 0" in r for r in got["SGLang"]["reasons"])
    if confidence and not with_markov and rank > 0 and head == "vanilla":
        assert got["SGLang"]["reasons"] == [
            r for r in got["SGLang"]["reasons"] if "confidence_head_with_markov false" in r
        ]
    speculative = payload["vllm_speculative_config"]
    if "vLLM" in loadable:
        assert speculative == {
            "method": "dspark",
            "model": str(folder.resolve()),
            "num_speculative_tokens": 4,
        }
    else:
        assert speculative is None


@pytest.mark.parametrize(
    ("layer_ids", "loadable", "words"),
    [
        ([-1, 1], {"dspark", "DeepSpec/NeMo", "vLLM"}, {"SGLang": "contains -1"}),
        (
            [0, TARGET_LAYERS - 1],
            {"dspark"},
            {
                "SGLang": f"contains {TARGET_LAYERS - 1} = n-1",
                "vLLM": "n-1",
                "DeepSpec/NeMo": "assert_no_final_target_layer",
            },
        ),
    ],
    ids=["embedding", "last-layer"],
)
def test_feature_layers_minus_one_and_n_minus_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, layer_ids: list[int], loadable: set[str], words: dict
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLayerWarning)
        folder = save_draft(tmp_path / "draft", target_layer_ids=layer_ids)
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert {name for name, v in got.items() if v["ok"]} == loadable
    for engine, word in words.items():
        assert any(word in reason for reason in got[engine]["reasons"]), (engine, got[engine]["reasons"])
    if -1 in layer_ids:
        assert got["SGLang"]["reasons"][0].startswith("unverified: ")  # an assumption, said so


def test_block_size_sets_the_vllm_config_and_each_engine_notes_its_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = save_draft(tmp_path / "draft", block_size=7)
    _, payload = check(capsys, folder)
    assert payload["vllm_speculative_config"]["num_speculative_tokens"] == 7
    for name in ("DeepSpec/NeMo", "vLLM", "SGLang"):
        assert any(note.startswith("block size: ") for note in verdicts(payload)[name]["notes"])


def test_a_checkpoint_without_the_target_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft", include_target_weights=False)
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert got["dspark"]["ok"] and "target=" in got["dspark"]["notes"][0]
    assert got["vLLM"]["ok"]  # it attaches the target's embeddings and lm_head
    assert not got["SGLang"]["ok"] and "embed_tokens.weight or lm_head.weight" in got["SGLang"]["reasons"][0]
    assert not got["DeepSpec/NeMo"]["ok"] and got["DeepSpec/NeMo"]["reasons"][0].startswith("unverified")


def test_a_draft_of_another_family_is_served_by_no_engine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = save_draft(tmp_path / "draft")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaDSparkModel"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(config))
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert {name for name, v in got.items() if v["ok"]} == {"dspark"}
    for name in ("DeepSpec/NeMo", "vLLM", "SGLang"):
        assert "config.architectures ['LlamaDSparkModel']" in got[name]["reasons"][0]


def test_text_output_require_and_bad_drafts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft", markov_head_type="gated")
    assert main(["check-draft", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]  # one per loader, then the config
    assert [line.split()[:2] for line in heads[:4]] == [
        ["dspark", "ok"],
        ["DeepSpec/NeMo", "ok"],
        ["vLLM", "no"],
        ["SGLang", "no"],
    ]
    assert lines[-2] == "vLLM speculative config: none (vLLM cannot load this draft)"
    assert main(["check-draft", str(folder), "--require", "deepspec"]) == 0
    assert main(["check-draft", str(folder), "--require", "vllm"]) == 1
    capsys.readouterr()

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["mask_token_id"] = config["vocab_size"]
    (broken / "config.json").write_text(json.dumps(config))
    code, payload = check(capsys, broken)
    assert code == 1 and "mask_token_id" in verdicts(payload)["dspark"]["reasons"][0]
    (broken / "model.safetensors").unlink()
    assert main(["check-draft", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model.safetensors" in err
    assert main(["check-draft", str(tmp_path / "nowhere")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_check_draft_imports_no_torch(tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft")
    probe = (
        "import sys; from dspark_core.cli import main; code = main(['check-draft', sys.argv[1]]); "
        "print('torch' in sys.modules, 'transformers' in sys.modules, code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "False False 0"


def test_every_rule_names_a_known_check_and_a_source() -> None:
    for engine in ENGINES:
        assert engine.version and engine.block_size
        for rule in engine.rules:
            assert rule.kind in CHECKS, rule
            # a rule read from source cites the commit; one that was not says where it came from
            assert "@" in rule.source if rule.verified else rule.source, rule


def test_train_warns_once_on_one_line_before_the_first_step() -> None:
    lines: list[str] = []
    options = {"num_draft_layers": 2, "mask_token_id": 95, "markov_rank": 8}  # default layer ids: n-1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLayerWarning)
        config = build_draft_config(target_config(), **options)
    assert config.target_layer_ids[-1] == TARGET_LAYERS - 1
    warn_unservable(config, lines.append)
    (line,) = lines
    assert "\n" not in line and line.startswith("warning: serving: ")
    for name in ("DeepSpec/NeMo cannot", "vLLM cannot", "SGLang cannot", "dspark check-draft"):
        assert name in line
    servable = build_draft_config(target_config(), **options, target_layer_ids=[0, 2])
    assert serving_summary(check_draft(draft_facts(servable))) is None
    warn_unservable(servable, lines.append)
    assert len(lines) == 1
