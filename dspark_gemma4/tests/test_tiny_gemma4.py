"""dspark-gemma4 end to end on a tiny random Gemma 4 target with sliding and full attention layers.

The installed family is listed ok and doctored, ``dspark make-tiny-target --random --family gemma4``
writes the target, ``dspark train`` runs a few steps, ``check-draft`` gives the Gemma 4 verdicts, a
resumed run is bit-identical to an uninterrupted one, and greedy speculative decoding equals
``target.generate(do_sample=False)`` well past the sliding window. The CLI runs as real subprocesses
of the installed console script, so the entry point comes from the installed distribution.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dspark_core.decoding.speculative import speculative_generate
from dspark_core.loading import load_draft
from dspark_core.training.config import TrainConfig
from dspark_core.training.trainer import Trainer
from dspark_gemma4.modeling import Gemma4DSparkModel
from dspark_gemma4.testing import TINY_SLIDING_WINDOW, make_tiny_target

ARCHITECTURES = (
    "Gemma4ForConditionalGeneration",
    "Gemma4ForCausalLM",
    "Gemma4UnifiedForConditionalGeneration",
    "Gemma4UnifiedForCausalLM",
)
DRAFT_CLASS = "dspark_gemma4.modeling:Gemma4DSparkModel"
#: Feature layers of the 4-layer target, leaving out n-1 so that DeepSpec and vLLM can serve the draft.
LAYER_IDS = [0, 2]


def dspark(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / ("dspark.exe" if os.name == "nt" else "dspark")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}
    result = subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=environment, timeout=600, check=False
    )
    assert result.returncode == 0, (
        f"dspark {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def chats(path: Path, count: int = 12) -> Path:
    topics = ("rivers", "bread", "trains", "the moon", "gardens", "maps", "coffee", "stars")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me something about {topics[i % len(topics)]}."},
                {
                    "role": "assistant",
                    "content": f"A short note on {topics[i % len(topics)]}: {i} times nice.",
                },
            ]
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A peaked output head (as `make-tiny-target --random` gives), so greedy decoding has no near-ties.
    return make_tiny_target(tmp_path_factory.mktemp("gemma4") / "target", logit_scale=30.0)


@pytest.fixture(scope="module")
def trained(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gemma4-run")
    result = dspark(
        "train", "--target", str(target_dir), "--data", str(chats(root / "chats.jsonl")),
        "--output-dir", str(root / "run"), "--max-steps", "3", "--batch-size", "4",
        "--num-draft-layers", "2", "--block-size", "4", "--num-anchors", "8", "--markov-rank", "16",
        "--target-layer-ids", ",".join(map(str, LAYER_IDS)), "--lr", "3e-3", "--no-progress",
        "--log-every", "1", "--device", "cpu",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "draft: Gemma4DSparkModel" in output and "trained 3 steps" in output
    return root / "run" / "draft"


def test_tiny_target_alternates_sliding_and_full_attention(target_dir: Path) -> None:
    config = AutoConfig.from_pretrained(target_dir)
    assert (config.model_type, config.architectures) == ("gemma4", ["Gemma4ForConditionalGeneration"])
    text = config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert text.sliding_window == TINY_SLIDING_WINDOW
    assert text.attention_k_eq_v and text.final_logit_softcapping == 30.0
    full = text.per_layer_config["full_attention"]
    assert (full.head_dim, full.num_key_value_heads) == (2 * text.per_layer_config[0].head_dim, 1)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"


def test_make_tiny_target_cli_writes_a_gemma4_target(tmp_path: Path) -> None:
    dspark("make-tiny-target", "--random", "--family", "gemma4", "--num-layers", "2", str(tmp_path / "t"))
    config = AutoConfig.from_pretrained(tmp_path / "t")
    assert config.model_type == "gemma4"
    assert config.text_config.layer_types == ["sliding_attention", "full_attention"]
    assert "gemma4" in dspark("make-tiny-target", "--list-families").stdout


def test_list_shows_every_gemma4_architecture_ok() -> None:
    rows = {row["architecture"]: row for row in json.loads(dspark("list", "--json").stdout)["architectures"]}
    for architecture in ARCHITECTURES:
        row = rows[architecture]
        assert row["status"] == "ok" and row["distribution"] == "dspark-gemma4", row
        assert row["draft_class"] == DRAFT_CLASS
    assert rows["Qwen3ForCausalLM"]["status"] == "ok"  # the families sit side by side


def test_doctor_builds_and_runs_a_tiny_gemma4_draft() -> None:
    lines = dspark("doctor").stdout.splitlines()
    (line,) = [line for line in lines if line.startswith("ok       Gemma4ForConditionalGeneration ->")]
    assert "tiny draft for family 'gemma4': forward and propose ok" in line, line
    # doctor's speculative decode ran on the tiny target's own sliding and full layers
    assert line.endswith(f"speculative decode ok (sliding window {TINY_SLIDING_WINDOW}, hybrid)"), line
    assert not any(line.startswith("PROBLEM") for line in lines)


def test_check_draft_verdicts_for_a_trained_gemma4_draft(trained: Path) -> None:
    verdicts = {
        v["engine"]: v for v in json.loads(dspark("check-draft", "--json", str(trained)).stdout)["verdicts"]
    }
    assert {name: v["ok"] for name, v in verdicts.items()} == {
        "dspark": True,
        "DeepSpec": True,
        "vLLM": True,
        "SGLang": False,  # SGLang has no Gemma 4 DSpark model
    }
    assert "Gemma4DSparkModel" in verdicts["SGLang"]["reasons"][0]
    (softcap,) = [rule for rule in verdicts["vLLM"]["rules"] if rule["rule"] == "logit-softcap"]
    assert "gemma4_dspark.py" in softcap["citation"] and "320-323" in softcap["citation"]
    written = json.loads((trained / "config.json").read_text())
    assert written["architectures"] == ["Gemma4DSparkModel"] and written["model_type"] == "gemma4_text"
    assert "per_layer_config" not in written and written["global_head_dim"] == 32


def test_check_draft_names_what_vllm_refuses(trained: Path, tmp_path: Path) -> None:
    from dspark_core.serving import check_draft, read_draft_dir

    facts = read_draft_dir(trained)
    edited = dataclasses.replace(
        facts, config={**facts.config, "attention_k_eq_v": False, "markov_head_type": "gated"}
    )
    vllm = {v.engine: v for v in check_draft(edited)}["vLLM"]
    assert not vllm.ok
    assert any("attention_k_eq_v false" in reason for reason in vllm.reasons)
    assert any("markov_head_type 'gated'" in reason for reason in vllm.reasons)
    deepspec = {v.engine: v for v in check_draft(edited)}["DeepSpec"]
    assert deepspec.ok  # DeepSpec has v_proj drafts and gated Markov heads


def test_check_draft_gemma4_vllm_readings(trained: Path) -> None:
    """vLLM's Gemma 4 loader per release: the confidence head is built (and the adaptive-verification
    flag printed) from 0.31; the embedding layer -1 is read; r = 0 is refused from 0.27 (the missing-weight
    check); a reduced vocabulary is refused (a full-vocabulary lm_head, no d2t)."""
    from dspark_core.serving import check_draft, read_draft_dir

    for release, built in (("0.30", False), ("0.34", True)):
        payload = json.loads(
            dspark("check-draft", "--json", "--engine-version", f"vllm={release}", str(trained)).stdout
        )
        vllm = {v["engine"]: v for v in payload["verdicts"]}["vLLM"]
        assert vllm["ok"] and payload["releases"]["vllm"] == release
        (head,) = [rule for rule in vllm["rules"] if rule["rule"] == "confidence-head"]
        assert ("uses it only with enable_adaptive_verification" in head["detail"]) == built
        speculative = payload["serving"]["vllm"]["speculative_config"]
        assert speculative.get("enable_adaptive_verification", False) == built

    facts = read_draft_dir(trained)
    assert facts.config["enable_confidence_head"] and facts.markov_rank == 16

    def vllm_at(release: str, tensor_names: frozenset[str] | None = None, **config: Any) -> Any:
        edited = dataclasses.replace(
            facts, config={**facts.config, **config}, tensor_names=tensor_names or facts.tensor_names
        )
        return {v.engine: v for v in check_draft(edited, releases={"vllm": release})}["vLLM"]

    embedding = vllm_at("0.34", target_layer_ids=[-1, 2])
    assert embedding.ok and any(r.rule == "embedding-layer" and r.ok for r in embedding.results)

    assert facts.tensor_names is not None
    no_markov = frozenset(name for name in facts.tensor_names if not name.startswith("markov_head."))
    rank_zero = {"markov_rank": 0, "confidence_head_with_markov": False}
    assert vllm_at("0.26", no_markov, **rank_zero).ok  # unverified at run time
    refused = vllm_at("0.34", no_markov, **rank_zero)
    assert not refused.ok and any("missing-weight check raises" in reason for reason in refused.reasons)

    vocab = int(facts.config["vocab_size"])
    reduced = vllm_at("0.34", draft_vocab_size=vocab // 2)
    assert not reduced.ok and any("lm_head [K, H] does not load" in reason for reason in reduced.reasons)


def test_greedy_speculative_equals_generate_past_the_sliding_window(target_dir: Path, trained: Path) -> None:
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    draft = load_draft(trained, target)
    assert isinstance(draft, Gemma4DSparkModel)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me something about rivers."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]  # fmt: skip
    new = 48
    assert prompt.shape[1] + new > 3 * TINY_SLIDING_WINDOW  # decoding runs well past the window
    with torch.no_grad():
        expected = target.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new)
    result = speculative_generate(target, draft, prompt, max_new_tokens=new, eos_token_id=[])
    assert result.new_tokens == expected[0, prompt.shape[1] :].tolist()
    assert len(result.new_tokens) == new


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.draft.named_parameters() if v.requires_grad}


def test_resume_is_bit_identical(target_dir: Path, tmp_path: Path) -> None:
    settings: dict[str, Any] = {
        "target": str(target_dir),
        "data": [str(chats(tmp_path / "chats.jsonl"))],
        "draft": {"num_draft_layers": 1, "block_size": 4, "num_anchors": 8, "markov_rank": 16,
                  "target_layer_ids": LAYER_IDS},
        "batch_size": 2, "max_steps": 6, "lr": 2e-3, "warmup_steps": 2, "max_length": 64,
        "log_every": 1, "save_every": 3, "progress": False, "seed": 3,
    }  # fmt: skip
    whole = Trainer(TrainConfig.from_mapping({**settings, "output_dir": str(tmp_path / "whole")}))
    whole.train()
    split = TrainConfig.from_mapping({**settings, "output_dir": str(tmp_path / "split")})
    first = Trainer(split)
    first.train(stop_at=3)
    at_three = trainable_state(first)
    del first
    second = Trainer(dataclasses.replace(split, resume=True))
    assert second.step == 3
    second.train()
    expected, resumed = trainable_state(whole), trainable_state(second)
    assert expected.keys() == resumed.keys() and len(expected) > 10
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert not torch.equal(at_three["fc.weight"], resumed["fc.weight"])  # the resumed steps trained


def test_a_published_config_without_the_default_global_head_dim_is_servable(trained: Path) -> None:
    """transformers 5.10 saves a diff against the class defaults, so the 12B draft's global_head_dim
    (the default 512) is not in its config.json; vLLM reads the default back."""
    from dspark_core.serving import check_draft, read_draft_dir

    facts = read_draft_dir(trained)
    config = {k: v for k, v in facts.config.items() if k != "global_head_dim"}
    verdicts = {v.engine: v.ok for v in check_draft(dataclasses.replace(facts, config=config))}
    assert verdicts == {"dspark": True, "DeepSpec": True, "vLLM": True, "SGLang": False}
