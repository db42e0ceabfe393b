"""``dspark check-draft`` and the serving rules read from the released engines: every head type and
confidence option, the feature layers -1 and n-1, r = 0, a reduced vocabulary, trimmed checkpoints,
other families, two engine releases where a rule differs, the serving flags, the --json schema, and
the one-line warning ``dspark train`` gives before its first step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from qwen3_draft_helpers import TARGET_LAYERS, VOCAB, make_draft, target_config
from safetensors.torch import load_file, save_file

from dspark_core.cli import main
from dspark_core.modeling.draft_config import TargetLayerWarning
from dspark_core.serving import (
    CHECKS,
    ENGINES,
    DraftFacts,
    Release,
    check_draft,
    draft_facts,
    engine_release,
    serving_summary,
)
from dspark_core.serving_flags import vllm_serving
from dspark_core.training.setup import warn_unservable
from dspark_qwen3.config import build_draft_config

LOADERS = ("dspark", "DeepSpec", "vLLM", "SGLang")
ENGINE_NAMES = LOADERS[1:]

# (markov_rank, head, confidence head, confidence with Markov) -> the loaders that load it at their
# newest releases, and, per engine that refuses it, the rule that does.
HEAD_MATRIX: list[tuple[int, str, bool, bool, dict[str, str | None]]] = [
    (8, "vanilla", False, False, {"DeepSpec": None, "vLLM": None, "SGLang": None}),
    (8, "vanilla", True, False, {"DeepSpec": None, "vLLM": None, "SGLang": None}),
    (8, "vanilla", True, True, {"DeepSpec": None, "vLLM": None, "SGLang": None}),
    (8, "gated", False, False, {"DeepSpec": None, "vLLM": "markov-head-types", "SGLang": None}),
    (8, "gated", True, True, {"DeepSpec": None, "vLLM": "markov-head-types", "SGLang": None}),
    (8, "rnn", True, False, {"DeepSpec": None, "vLLM": "markov-head-types", "SGLang": None}),
    (8, "rnn", False, False, {"DeepSpec": None, "vLLM": "markov-head-types", "SGLang": None}),
    (0, "vanilla", False, False, {"DeepSpec": None, "vLLM": None, "SGLang": "markov-rank-zero"}),
    (0, "vanilla", True, False, {"DeepSpec": None, "vLLM": None, "SGLang": "markov-rank-zero"}),
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


def rule(verdict: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [r for r in verdict["rules"] if r["rule"] == name]
    return found


def refusing_rules(verdict: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in verdict["rules"] if not r["ok"]]


@pytest.mark.parametrize(
    ("rank", "head", "confidence", "with_markov", "refused_by"),
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
    refused_by: dict[str, str | None],
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
    assert got["dspark"]["ok"]
    assert payload["releases"] == {"deepspec": "main", "vllm": "0.34", "sglang": "0.5.23"}
    for engine, refusing in refused_by.items():
        verdict = got[engine]
        assert verdict["ok"] == (refusing is None), (engine, verdict["reasons"])
        assert refusing_rules(verdict) == ([refusing] if refusing else []), engine
        assert rule(verdict, "architectures")["ok"]
        for result in verdict["rules"]:
            assert re.search(r":\d+", result["citation"]), result  # every verdict cites file:line
    # Head types: all three load in DeepSpec and SGLang, only vanilla in vLLM.
    if rank > 0:
        assert rule(got["SGLang"], "markov-head-types")["ok"]
        assert rule(got["DeepSpec"], "markov-head-types")["ok"]
        assert rule(got["vLLM"], "markov-head-types")["ok"] == (head == "vanilla")
        assert f"markov_head_type {head!r}" in rule(got["vLLM"], "markov-head-types")["detail"]
    else:
        vllm_zero = rule(got["vLLM"], "markov-rank-zero")
        assert vllm_zero["ok"] and not vllm_zero["verified"]  # loads, but only a run would settle it
        assert vllm_zero["detail"].startswith("unverified: ")
        assert rule(got["DeepSpec"], "markov-rank-zero")["verified"]
    # The confidence head, with or without Markov features, refuses nowhere; each engine says how.
    for engine in ENGINE_NAMES:
        detail = rule(got[engine], "confidence-head")["detail"]
        if confidence:
            assert f"a confidence head {'with' if with_markov else 'without'} Markov features" in detail
        else:
            assert detail.startswith("no confidence head")
    serving = payload["serving"]
    if refused_by["vLLM"] is None:
        expected = {"method": "dspark", "model": str(folder.resolve()), "num_speculative_tokens": 4}
        if confidence:
            expected["enable_adaptive_verification"] = True
        assert serving["vllm"]["speculative_config"] == expected
        assert payload["vllm_speculative_config"] == expected
        assert serving["vllm"]["command"].startswith("vllm serve TARGET --speculative-config ")
    else:
        assert serving["vllm"] is None and payload["vllm_speculative_config"] is None
    if refused_by["SGLang"] is None:
        mode = "cap-accept" if confidence else "static"
        assert serving["sglang"]["env"] == {"SGLANG_RAGGED_VERIFY_MODE": mode}
        assert serving["sglang"]["args"] == [
            "--speculative-algorithm",
            "DSPARK",
            "--speculative-draft-model-path",
            str(folder.resolve()),
            "--speculative-dspark-block-size",
            "4",
        ]
    else:
        assert serving["sglang"] is None


@pytest.mark.parametrize(
    ("layer_ids", "refused_by", "words"),
    [
        ([-1, 1], {"SGLang": "embedding-layer"}, {"SGLang": "refuses a target layer id below 0"}),
        (
            [0, TARGET_LAYERS - 1],
            {"DeepSpec": "last-layer", "vLLM": "last-layer", "SGLang": "last-layer"},
            {
                "DeepSpec": "asserts the final target layer is no feature layer",
                "vLLM": "captured before the final norm",
                "SGLang": "n-1 is never captured",
            },
        ),
    ],
    ids=["embedding", "last-layer"],
)
def test_feature_layers_minus_one_and_n_minus_one(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    layer_ids: list[int],
    refused_by: dict[str, str],
    words: dict[str, str],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLayerWarning)
        folder = save_draft(tmp_path / "draft", target_layer_ids=layer_ids)
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert got["dspark"]["ok"]
    for engine in ENGINE_NAMES:
        assert refusing_rules(got[engine]) == ([refused_by[engine]] if engine in refused_by else []), engine
        assert got[engine]["ok"] == (engine not in refused_by)
    for engine, word in words.items():
        result = rule(got[engine], refused_by[engine])
        assert word in result["detail"] and result["verified"], result
    if -1 in layer_ids:
        # -1 is the embedding output: both DeepSpec and vLLM read it.
        assert rule(got["vLLM"], "embedding-layer")["ok"] and rule(got["DeepSpec"], "embedding-layer")["ok"]


def test_block_size_sets_the_serving_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft", block_size=7)
    _, payload = check(capsys, folder)
    assert payload["serving"]["vllm"]["speculative_config"]["num_speculative_tokens"] == 7
    assert payload["serving"]["sglang"]["args"][-2:] == ["--speculative-dspark-block-size", "7"]
    for name in ENGINE_NAMES:
        assert "block_size 7" in rule(verdicts(payload)[name], "block-size")["detail"]


def test_two_vllm_releases_where_the_confidence_head_rule_differs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = save_draft(tmp_path / "draft")  # a confidence head with Markov features
    _, old = check(capsys, folder, "--engine-version", "vllm=0.25")
    _, new = check(capsys, folder, "--engine-version", "vllm=0.34")
    assert old["releases"]["vllm"] == "0.25" and new["releases"]["vllm"] == "0.34"
    old_head, new_head = (rule(verdicts(p)["vLLM"], "confidence-head") for p in (old, new))
    assert "skips confidence_head weights" in old_head["detail"] and "vllm 0.25.0" in old_head["citation"]
    assert "enable_adaptive_verification" in new_head["detail"] and "0.34.0" in new_head["citation"]
    # 0.25 has no adaptive verification: the flag would be refused there, so it is not printed.
    assert "enable_adaptive_verification" not in old["serving"]["vllm"]["speculative_config"]
    assert new["serving"]["vllm"]["speculative_config"]["enable_adaptive_verification"] is True
    _, mid = check(capsys, folder, "--engine-version", "vllm=0.28.1")
    assert "raises for a draft without one" in rule(verdicts(mid)["vLLM"], "confidence-head")["detail"]
    assert mid["serving"]["vllm"]["speculative_config"]["enable_adaptive_verification"] is True
    # block_size: required as num_speculative_tokens up to 0.33, a default from 0.34
    assert "must be given" in rule(verdicts(old)["vLLM"], "block-size")["detail"]
    assert "defaults to block_size" in rule(verdicts(new)["vLLM"], "block-size")["detail"]


def reduced_vocabulary_draft(folder: Path, size: int, *, drop: tuple[str, ...] = ()) -> Path:
    """A reduced-vocabulary draft written from vLLM's loader layout: draft_vocab_size K < vocab_size,
    lm_head.weight [K, H], markov_w2 [K, r] and d2t [K] offsets (target id = draft id + d2t[id])."""
    save_draft(folder)
    weights = load_file(folder / "model.safetensors")
    kept = torch.arange(0, 2 * size, 2)  # every other target token
    weights["lm_head.weight"] = weights["lm_head.weight"][kept].contiguous()
    weights["markov_head.markov_w2.weight"] = weights["markov_head.markov_w2.weight"][kept].contiguous()
    weights["d2t"] = kept - torch.arange(size)
    for name in drop:
        del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["draft_vocab_size"] = size
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def test_a_reduced_vocabulary_is_served_by_vllm_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    size = VOCAB // 2
    folder = reduced_vocabulary_draft(tmp_path / "draft", size)
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert got["vLLM"]["ok"] and refusing_rules(got["SGLang"]) == ["reduced-vocabulary"]
    assert refusing_rules(got["DeepSpec"]) == ["reduced-vocabulary"]
    served = rule(got["vLLM"], "reduced-vocabulary")
    assert f"draft_vocab_size {size} < vocab_size {VOCAB}" in served["detail"]
    assert f"lm_head, d2t and markov_w2 of {size} rows" in served["detail"]
    assert "never shared" in served["detail"] and "vllm 0.34.0" in served["citation"]
    assert "builds markov_w2 [vocab_size, r]" in rule(got["SGLang"], "reduced-vocabulary")["detail"]
    assert "[vocab_size, hidden]" in rule(got["DeepSpec"], "reduced-vocabulary")["detail"]
    assert payload["serving"]["vllm"]["speculative_config"]["num_speculative_tokens"] == 4

    # 0.29 to 0.33 raise on a missing d2t; 0.34 does not detect it: both refuse it here.
    broken = reduced_vocabulary_draft(tmp_path / "broken", size, drop=("d2t",))
    for release, words in (("0.29", "raises when lm_head or d2t is missing"), ("0.34", "not detected")):
        _, payload = check(capsys, broken, "--engine-version", f"vllm={release}")
        result = rule(verdicts(payload)["vLLM"], "reduced-vocabulary")
        assert not result["ok"] and "d2t absent" in result["detail"] and words in result["detail"]


def gemma4_config(**overrides: Any) -> dict[str, Any]:
    """The fields the rules read from a Gemma 4 draft's config.json, as dspark-gemma4 writes them (a
    tiny draft: one full-attention layer with K = V, r = 8, a confidence head with Markov features)."""
    config: dict[str, Any] = {
        "architectures": ["Gemma4DSparkModel"],
        "model_type": "gemma4_text",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "layer_types": ["full_attention"],
        "attention_k_eq_v": True,
        "final_logit_softcapping": 30.0,
        "num_target_layers": TARGET_LAYERS,
        "target_layer_ids": [0, 2],
        "mask_token_id": VOCAB - 1,
        "block_size": 4,
        "num_anchors": 8,
        "markov_rank": 8,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
    }
    config.update(overrides)
    return config


def gemma4_vllm(config: dict[str, Any], release: str, facts: DraftFacts | None = None) -> Any:
    facts = facts or draft_facts(config)
    (verdict,) = [v for v in check_draft(facts, releases={"vllm": release}) if v.engine == "vLLM"]
    assert verdict.version == release
    return verdict


def gemma4_rule(verdict: Any, name: str) -> Any:
    (found,) = [r for r in verdict.results if r.rule == name]
    return found


@pytest.mark.parametrize(
    "release", ["0.26", "0.27", "0.27.1", "0.28", "0.29", "0.30", "0.31", "0.33", "0.34"]
)
def test_gemma4_vllm_confidence_head_and_serving_flag_per_release(release: str) -> None:
    """vLLM's Gemma 4 loader skips a confidence head up to 0.30 (and from 0.28 the speculator reads the
    head it lacks under enable_adaptive_verification), and builds it from 0.31: the flag is printed only
    then."""
    facts, parsed = draft_facts(gemma4_config()), Release.parse(release)
    verdict = gemma4_vllm(dict(facts.config), release)
    assert verdict.ok and not [r.rule for r in verdict.results if not r.ok]
    head = gemma4_rule(verdict, "confidence-head")
    assert head.ok and head.verified and head.informational
    assert "a confidence head with Markov features" in head.detail
    built = parsed >= Release.parse("0.31")
    speculative = vllm_serving("draft", facts, parsed)["speculative_config"]
    assert ("enable_adaptive_verification" in speculative) == built
    if built:
        assert "uses it only with enable_adaptive_verification" in head.detail
        assert "vllm 0.31.0" in head.citation and "0.34.0" in head.citation
    else:
        assert "skips confidence_head weights" in head.detail
        adaptive = parsed >= Release.parse("0.28")  # the flag exists, and would fail on the absent head
        first = "0.28.0" if adaptive else "0.26.0"
        assert f"vllm {first} vllm/model_executor/models/gemma4_dspark.py:" in head.citation
        assert ("leave that off" in head.detail) == adaptive
        assert ("speculator.py:" in head.citation) == adaptive
    # A Qwen3 draft with the same head gets the flag from 0.28 (adaptive verification's first release).
    qwen3 = draft_facts({**gemma4_config(), "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3"})
    qwen3_config = vllm_serving("draft", qwen3, Release.parse(release))["speculative_config"]
    assert ("enable_adaptive_verification" in qwen3_config) == (parsed >= Release.parse("0.28"))


def test_gemma4_vllm_reads_the_embedding_layer_minus_one() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLayerWarning)
        config = gemma4_config(target_layer_ids=[-1, 1])
        for release in ("0.26", "0.34"):
            verdict = gemma4_vllm(config, release)
            embedding = gemma4_rule(verdict, "embedding-layer")
            assert verdict.ok and embedding.ok and embedding.verified
            assert "the scaled embedding output" in embedding.detail
            assert "gemma4.py:" in embedding.citation and "eagle3_utils.py:" in embedding.citation
    # A draft without -1 gets no embedding-layer reading.
    assert not [r for r in gemma4_vllm(gemma4_config(), "0.34").results if r.rule == "embedding-layer"]


def test_gemma4_vllm_markov_rank_zero_loads_only_on_0_26() -> None:
    """0.26 builds the rank-0 head from modules the missing-weight check passes over (unverified at run
    time, as for Qwen3); from 0.27 markov_w1 is a plain nn.Embedding and the check raises."""
    config = gemma4_config(markov_rank=0, confidence_head_with_markov=False)
    old = gemma4_vllm(config, "0.26")
    zero = gemma4_rule(old, "markov-rank-zero")
    assert old.ok and zero.ok and not zero.verified and zero.detail.startswith("unverified: ")
    for release in ("0.27", "0.30", "0.34"):
        verdict = gemma4_vllm(config, release)
        assert [r.rule for r in verdict.results if not r.ok] == ["markov-rank-zero"]
        zero = gemma4_rule(verdict, "markov-rank-zero")
        assert zero.verified and "missing-weight check raises" in zero.detail
        assert "default_loader.py:" in zero.citation
    # vLLM's Qwen3 loader returns no names, so no check runs: its r = 0 reading stays as it was.
    qwen3 = {**config, "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3"}
    qwen3_zero = gemma4_rule(gemma4_vllm(qwen3, "0.34"), "markov-rank-zero")
    assert qwen3_zero.ok and not qwen3_zero.verified


def test_gemma4_vllm_refuses_a_reduced_vocabulary() -> None:
    size = VOCAB // 2
    config = gemma4_config(draft_vocab_size=size)
    shapes = {"lm_head.weight": (size, 32), "d2t": (size,), "markov_head.markov_w2.weight": (size, 8)}
    shapes |= {"embed_tokens.weight": (VOCAB, 32), "markov_head.markov_w1.weight": (VOCAB, 8)}
    with_checkpoint = DraftFacts(config, frozenset(shapes), shapes)
    for release in ("0.26", "0.34"):
        for facts in (draft_facts(config), with_checkpoint):
            verdict = gemma4_vllm(config, release, facts)
            assert [r.rule for r in verdict.results if not r.ok] == ["reduced-vocabulary"]
            reduced = gemma4_rule(verdict, "reduced-vocabulary")
            assert f"draft_vocab_size {size} < vocab_size {VOCAB}" in reduced.detail
            assert "lm_head [K, H] does not load" in reduced.detail and reduced.verified
            assert "vocab_parallel_embedding.py:" in reduced.citation
    # DeepSpec's Gemma 4 draft has a full-vocabulary lm_head too; a full vocabulary has no such reading.
    (deepspec,) = [v for v in check_draft(draft_facts(config)) if v.engine == "DeepSpec"]
    assert [r.rule for r in deepspec.results if not r.ok] == ["reduced-vocabulary"]
    assert not [r for r in gemma4_vllm(gemma4_config(), "0.34").results if r.rule == "reduced-vocabulary"]


def test_a_checkpoint_without_the_target_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft", include_target_weights=False)
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    assert got["dspark"]["ok"] and "target=" in got["dspark"]["notes"][0]
    assert got["vLLM"]["ok"] and got["SGLang"]["ok"]  # both attach the target's embeddings and lm_head
    assert refusing_rules(got["DeepSpec"]) == ["target-weights"]
    assert "draft's own embed_tokens and lm_head" in rule(got["DeepSpec"], "target-weights")["detail"]


def test_a_draft_of_another_family_is_served_by_no_engine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = save_draft(tmp_path / "draft")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaDSparkModel"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(config))
    _, payload = check(capsys, folder)
    got = verdicts(payload)
    for name in ENGINE_NAMES:
        assert refusing_rules(got[name]) == ["architectures"]
        reason = got[name]["reasons"][0]
        assert "['LlamaDSparkModel'] names none of [" in reason and "'Qwen3DSparkModel'" in reason
    assert "config.architectures[0]" in got["DeepSpec"]["reasons"][0]  # it reads the first name only


def test_json_schema_is_stable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, payload = check(capsys, save_draft(tmp_path / "draft"))
    assert list(payload) == [
        "schema_version",
        "draft",
        "target",
        "releases",
        "verdicts",
        "serving",
        "vllm_speculative_config",
        "nemo",
        "calibration",
    ]
    assert payload["schema_version"] == 2
    for verdict in payload["verdicts"]:
        assert list(verdict) == ["engine", "version", "ok", "reasons", "notes", "rules"]
        for result in verdict["rules"]:
            assert list(result) == ["rule", "ok", "verified", "detail", "citation"]
    assert list(payload["serving"]) == ["vllm", "sglang"]
    assert list(payload["serving"]["vllm"]) == ["release", "speculative_config", "command"]
    assert list(payload["serving"]["sglang"]) == ["release", "env", "args", "command", "notes"]
    assert "no loader" in payload["nemo"]


def test_text_output_require_and_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = save_draft(tmp_path / "draft", markov_head_type="gated")
    assert main(["check-draft", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")][:4]
    assert [line.split() for line in heads] == [
        ["dspark", "ok"],
        ["DeepSpec", "main", "ok"],
        ["vLLM", "0.34", "no"],
        ["SGLang", "0.5.23", "ok"],
    ]
    assert any(line.strip().startswith("markov-head-types: markov_head_type 'gated'") for line in lines)
    assert "serve with vLLM: none (vLLM cannot load this draft)" in lines
    assert any(
        line.startswith("serve with SGLang 0.5.23: SGLANG_RAGGED_VERIFY_MODE=cap-accept") for line in lines
    )
    assert main(["check-draft", str(folder), "--require", "deepspec", "--require", "sglang"]) == 0
    assert main(["check-draft", str(folder), "--require", "vllm"]) == 1
    capsys.readouterr()

    for args, words in (
        (["--require", "nemo"], "NeMo AutoModel has no loader"),
        (["--engine-version", "vllm=0.24"], "vLLM 0.24 is outside the supported releases (0.25 to 0.34)"),
        (["--engine-version", "sglang=0.5.24"], "SGLang 0.5.24 is outside the supported releases"),
        (["--engine-version", "deepspec=v1"], "DeepSpec v1 is outside the supported releases (main)"),
        (["--engine-version", "vllm"], "write ENGINE=RELEASE"),
        (["--engine-version", "trt=1.0"], "no engine 'trt'"),
    ):
        assert main(["check-draft", str(folder), *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (args, err)

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
        "import sys; from dspark_core.cli import main; "
        "code = main(['check-draft', sys.argv[1], '--engine-version', 'vllm=0.25']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules, code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "False False 0"


def test_every_rule_cites_a_release_file_and_line_and_covers_its_range() -> None:
    for engine in ENGINES:
        marker = {"vllm": "vllm 0.", "sglang": "sglang 0.5.", "deepspec": "DeepSpec main @"}[engine.key]
        assert engine.dispatch.kind == "architectures" and marker in engine.dispatch.citation
        for item in engine.rules:
            assert item.kind in CHECKS, item
            assert marker in item.citation and re.search(r"\.py:\d+", item.citation), item
            assert not item.unverified or len(item.unverified) > 40  # an unverified rule says why
        # Each rule name has exactly one reading at every supported release.
        if engine.key == "vllm":
            releases = [Release.parse(f"0.{minor}") for minor in range(25, 35)]
        elif engine.key == "sglang":
            releases = [Release.parse(f"0.5.{patch}") for patch in range(16, 24)]
        else:
            releases = [Release.parse("main")]
        # A release with no loader for the block's drafts (vLLM 0.25 and Gemma 4) has that one reading.
        absent = {item.name for item in engine.rules if item.kind == "no_loader"}
        names = {item.name for item in engine.rules} - absent
        for release in releases:
            readings = [item.name for item in engine.rules_for(release)]
            if absent & set(readings):
                assert readings == sorted(absent), (engine.name, str(release))
                continue
            assert sorted(readings) == sorted(names), (engine.name, str(release))
    assert str(engine_release("vllm")) == "0.34" and str(engine_release("sglang", "0.5.16")) == "0.5.16"


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
    for name in ("DeepSpec main cannot", "vLLM 0.34 cannot", "SGLang 0.5.23 cannot", "dspark check-draft"):
        assert name in line
    assert "the features differ" in line  # vLLM's reason for n-1 is the pre-norm capture
    servable = build_draft_config(target_config(), **options, target_layer_ids=[0, 2])
    assert serving_summary(check_draft(draft_facts(servable))) is None
    warn_unservable(servable, lines.append)
    assert len(lines) == 1
    # A release other than the newest is checked on request.
    gated = build_draft_config(target_config(), **options, target_layer_ids=[0, 2], markov_head_type="gated")
    summary = serving_summary(check_draft(draft_facts(gated), releases={"vllm": "0.25"}))
    assert summary is not None and "vLLM 0.25 cannot (markov_head_type 'gated'" in summary
