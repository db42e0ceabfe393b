"""``examples/dspark-llama``, the worked third-party family, end to end as a user gets it.

It is built as a wheel, installed into a fresh venv beside dspark-core and dspark-qwen3, listed and
doctored by the CLI, trained for a few steps by ``dspark train`` on a tiny local Llama target with
Llama-3 RoPE scaling, and its greedy speculative output is checked against ``target.generate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from wheel_helpers import ROOT, build_wheel, make_venv, pip_install

pytestmark = pytest.mark.slow  # a wheel build, a venv and three interpreters importing torch

EXAMPLE = ROOT / "examples" / "dspark-llama"
FAMILY_FILES = ("plugin.py", "config.py", "modeling.py")
NEW_TOKENS = 24


def non_blank_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def make_tiny_llama(out: Path) -> Path:
    """A random tiny LlamaForCausalLM with llama3 RoPE scaling and the tiny ChatML tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dspark_qwen3.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(320)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked outputs, like a trained model: no argmax ties
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_chats(path: Path) -> Path:
    topics = ("rivers", "bread", "trains", "the moon", "gardens", "maps", "coffee", "stars")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me something about {topic}."},
                {"role": "assistant", "content": f"A short note about {topic}: it is {i} times nice."},
            ]
        }
        for i, topic in enumerate(topics)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class Env:
    """The venv with dspark-llama installed, and the command runner for it."""

    def __init__(self, python: Path) -> None:
        self.python = python

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}
        result = subprocess.run([str(self.python), *args], env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def dspark(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "dspark_core.cli", *args)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("llama-example")
    wheel = build_wheel(EXAMPLE, root / "wheels")
    assert wheel.name.startswith("dspark_llama-0.1.0-")
    python = make_venv(root / "venv")
    pip_install(python, wheel)
    return Env(python)


@pytest.fixture(scope="module")
def trained(env: Env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama-run")
    target = make_tiny_llama(root / "target")
    run_dir = root / "run"
    result = env.dspark(
        "train", "--target", str(target), "--data", str(write_chats(root / "chats.jsonl")),
        "--output", str(run_dir), "--max-steps", "3", "--batch-size", "4", "--num-draft-layers", "1",
        "--block-size", "4", "--num-anchors", "8", "--markov-rank", "16",
        "--lr", "3e-3", "--no-progress", "--log-every", "1", "--device", "cpu",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "draft: LlamaDSparkModel" in output
    # The default feature layer is the target's last (n-1): the SGLang layer warning is folded into
    # the serving check's single line, which also says no engine knows a Llama draft.
    serving = [line for line in output.splitlines() if line.startswith("warning: serving:")]
    assert len(serving) == 1 and "TargetLayerWarning" not in output
    assert all(f"{name} cannot" in serving[0] for name in ("DeepSpec main", "vLLM 0.34", "SGLang 0.5.23"))
    return target, run_dir / "draft"


def test_the_family_fits_in_forty_lines() -> None:
    package = EXAMPLE / "src" / "dspark_llama"
    assert sum(non_blank_lines(package / name) for name in FAMILY_FILES) <= 40


def test_installed_wheel_is_listed_ok_and_doctor_passes(env: Env) -> None:
    listing = json.loads(env.dspark("list", "--json").stdout)
    rows = {row["architecture"]: row for row in listing["architectures"] if row["architecture"]}
    llama = rows["LlamaForCausalLM"]
    assert llama["status"] == "ok" and llama["distribution"] == "dspark-llama"
    assert llama["draft_class"] == "dspark_llama.modeling:LlamaDSparkModel"
    assert rows["Qwen3ForCausalLM"]["status"] == "ok"  # the two families sit side by side
    doctor = env.dspark("doctor")
    assert "LlamaForCausalLM -> dspark_llama.modeling.LlamaDSparkModel" in doctor.stdout


CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from dspark_core import resolve_dspark_draft_spec
from dspark_core.decoding.speculative import speculative_generate

target_dir, draft_dir, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
draft = resolve_dspark_draft_spec(target.config.architectures).draft_cls.from_pretrained(draft_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(target_dir)
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Tell me something about rivers."}],
    add_generation_prompt=True, return_tensors="pt", return_dict=True,
)["input_ids"]
with torch.no_grad():
    expected = target.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new)
result = speculative_generate(target, draft, prompt, max_new_tokens=new, eos_token_id=[])
print(json.dumps({
    "draft_class": f"{type(draft).__module__}.{type(draft).__name__}",
    "config": {k: draft.config.to_dict()[k] for k in ("model_type", "architectures", "rope_parameters")},
    "q_norm": any("q_norm" in k for k in draft.state_dict()),
    "speculative": result.new_tokens,
    "greedy": expected[0, prompt.shape[1]:].tolist(),
}))
"""


def test_dspark_train_gives_a_greedy_exact_llama_draft(env: Env, trained: tuple[Path, Path]) -> None:
    target, draft = trained
    out = json.loads(env.run("-c", textwrap.dedent(CHECK), str(target), str(draft), str(NEW_TOKENS)).stdout)
    assert out["draft_class"] == "dspark_llama.modeling.LlamaDSparkModel"
    assert out["config"]["model_type"] == "llama"
    assert out["config"]["architectures"] == ["LlamaDSparkModel"]
    assert out["config"]["rope_parameters"]["rope_type"] == "llama3"
    assert out["q_norm"] is False
    assert len(out["greedy"]) == NEW_TOKENS
    assert out["speculative"] == out["greedy"]
