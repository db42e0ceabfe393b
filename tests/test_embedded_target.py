"""The embedded targets: corpus split, deterministic pretraining, the shipped target, the family hook."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_core import hookimpl
from dspark_core.cli import main as cli_main
from dspark_core.datagen.code_demo import CodeDemoRecipe, select_tasks
from dspark_core.errors import DSparkError
from dspark_core.targets.build import PretrainedTargetSpec, make_pretrained_target
from dspark_core.targets.corpus import Corpus
from dspark_core.targets.pretrain import PretrainRecipe
from dspark_core.targets.shipped import SHIPPED_DIR, install_shipped_target, verify
from dspark_core.testing import isolated_registry

CORE_SOURCE = Path(__file__).resolve().parents[1] / "dspark_core" / "src" / "dspark_core"
QUICK = PretrainedTargetSpec(
    bpe_vocab_size=300,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    recipe=PretrainRecipe(steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_windows=2),
)


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    """Forty stdlib files, both splits represented: quick to tokenise, still real text."""
    full = Corpus.stdlib()
    train = full.split("train")[:36]
    heldout = full.split("heldout")[:4]
    return Corpus(full.root, sorted(train + heldout, key=lambda f: f.relative_path))


def test_no_corpus_file_is_in_both_splits() -> None:
    corpus = Corpus.stdlib()
    train = {f.relative_path for f in corpus.split("train")}
    heldout = {f.relative_path for f in corpus.split("heldout")}
    assert train and heldout and not train & heldout
    assert train | heldout == {f.relative_path for f in corpus.files}
    record = corpus.record()
    assert record["num_files"] == len(corpus.files) and len(record["file_list_sha256"]) == 64


def test_demo_prompts_come_from_disjoint_files() -> None:
    train, heldout = select_tasks(Corpus.stdlib(), CodeDemoRecipe(num_train=300, num_heldout=40))
    train_files = {t.source.rsplit(":", 1)[0] for t in train}
    heldout_files = {t.source.rsplit(":", 1)[0] for t in heldout}
    assert len(train) == 300 and len(heldout) == 40
    assert not train_files & heldout_files
    assert all(
        t.prompt.startswith("Complete this Python function:\n") and "def " in t.prompt for t in heldout
    )


def test_the_prompt_limit_counts_template_tokens_and_keeps_the_counts() -> None:
    from transformers import AutoTokenizer

    from dspark_core.datagen.code_demo import prompt_fits
    from dspark_core.training.data import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    corpus = Corpus.stdlib()
    recipe = CodeDemoRecipe(num_train=50, num_heldout=10, max_prompt_tokens=96)
    lengths = {
        t.source: len(encode_prompt(tokenizer, t.messages(with_answer=False)))
        for t in select_tasks(corpus, CodeDemoRecipe(num_train=50, num_heldout=10))[1]
    }
    assert any(n > 96 for n in lengths.values())  # the limit has something to leave out here
    train, heldout = select_tasks(corpus, recipe, fits=lambda t: prompt_fits(t, tokenizer, 96))
    assert len(train) == 50 and len(heldout) == 10
    for task in train + heldout:
        assert len(encode_prompt(tokenizer, task.messages(with_answer=False))) <= 96


def test_pretraining_is_deterministic_and_recorded(small_corpus: Corpus, tmp_path: Path) -> None:
    first, _, reused = make_pretrained_target(tmp_path / "a", QUICK, corpus=small_corpus)
    second, _, _ = make_pretrained_target(tmp_path / "b", QUICK, corpus=small_corpus)
    assert not reused
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    saved = json.loads((first / "dspark_target.json").read_text())
    assert saved["corpus"] == small_corpus.record() and saved["spec"] == QUICK.as_dict()
    assert saved["heldout_perplexity"] > 1
    # The same arguments again: the folder is reused, not rebuilt.
    before = (first / "model.safetensors").stat().st_mtime_ns
    _, _, reused = make_pretrained_target(first, QUICK, corpus=small_corpus)
    assert reused and (first / "model.safetensors").stat().st_mtime_ns == before


def test_a_different_seed_gives_different_weights(small_corpus: Corpus, tmp_path: Path) -> None:
    from dspark_core.targets.build import with_recipe

    a, _, _ = make_pretrained_target(tmp_path / "a", QUICK, corpus=small_corpus)
    b, _, _ = make_pretrained_target(tmp_path / "b", with_recipe(QUICK, seed=1), corpus=small_corpus)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_shipped_target_is_small_verified_and_chats(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (SHIPPED_DIR / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    record = verify(SHIPPED_DIR)
    assert record["script"] == "scripts/build_shipped_target.py" and record["corpus"]["num_files"] > 100
    out, _, reused = install_shipped_target(tmp_path / "target")
    assert not reused and install_shipped_target(out)[2]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Complete this Python function:\ndef add(a, b):\n"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out_ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] > prompt["input_ids"].shape[1]


def test_a_corrupt_copy_is_refused(tmp_path: Path) -> None:
    out, _, _ = install_shipped_target(tmp_path / "target")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DSparkError, match=r"model\.safetensors: missing or corrupt"):
        verify(out)
    with pytest.raises(DSparkError, match="holds a different target"):
        install_shipped_target(out)


class _LlamaFamily:
    """An in-process plugin whose tiny-target builder makes a Llama: not a family core knows."""

    calls = 0

    @hookimpl
    def dspark_tiny_target_builders(self) -> dict[str, object]:
        def build(shape: object) -> object:
            from transformers import LlamaConfig, LlamaForCausalLM

            _LlamaFamily.calls += 1
            config = LlamaConfig(
                vocab_size=shape.vocab_size,  # type: ignore[attr-defined]
                hidden_size=shape.hidden_size,  # type: ignore[attr-defined]
                intermediate_size=shape.ffn_size,  # type: ignore[attr-defined]
                num_hidden_layers=shape.num_layers,  # type: ignore[attr-defined]
                num_attention_heads=shape.num_heads,  # type: ignore[attr-defined]
                num_key_value_heads=shape.num_kv_heads,  # type: ignore[attr-defined]
                architectures=["LlamaForCausalLM"],
            )
            return LlamaForCausalLM(config)

        return {"tiny-llama": build}


def test_family_hook_provides_the_builder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with isolated_registry(autoload=False) as registry:
        registry.register_plugin(_LlamaFamily(), name="llama-family")
        assert cli_main(["make-tiny-target", "--list-families"]) == 0
        assert "tiny-llama" in capsys.readouterr().out
        code = cli_main(
            [
                "make-tiny-target",
                str(tmp_path / "t"),
                "--random",
                "--family",
                "tiny-llama",
                "--num-layers",
                "1",
            ]
        )
        assert code == 0 and _LlamaFamily.calls == 1
        config = json.loads((tmp_path / "t" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
        assert cli_main(["make-tiny-target", str(tmp_path / "u"), "--random", "--family", "qwen3"]) == 1
    assert "no plugin builds tiny targets of family 'qwen3'" in capsys.readouterr().err


def test_core_never_imports_a_plugin() -> None:
    offenders = []
    for path in CORE_SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0].startswith("dspark_") and n.split(".")[0] != "dspark_core"
            ]
    assert offenders == []


def test_target_and_data_build_with_the_network_unreachable(tmp_path: Path) -> None:
    """Every socket connection fails in the child; the builds still succeed (nothing is fetched)."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise OSError('network access attempted in an offline test')\n"
        "socket.socket.connect = _refuse\n"
        "socket.create_connection = _refuse\n"
    )
    script = (
        "from dspark_core.targets.shipped import install_shipped_target\n"
        "from dspark_core.datagen.code_demo import CodeDemoRecipe, build_code_demo_data\n"
        f"install_shipped_target({str(tmp_path / 'target')!r})\n"
        f"build_code_demo_data({str(tmp_path / 'target')!r}, {str(tmp_path / 'data')!r}, "
        "CodeDemoRecipe(num_train=4, num_heldout=2, max_new_tokens=4, batch_size=4), progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "data" / "train.jsonl").read_text().splitlines()) == 4


def test_quickstart_example_config_matches_the_command() -> None:
    from dspark_core.quickstart import TRAINING, QuickstartPaths, training_config
    from dspark_core.training.config import TrainConfig

    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"
    from_file = TrainConfig.from_file(example)
    built_in = training_config(QuickstartPaths(Path("runs/quickstart")))
    assert from_file.to_dict() == {**built_in.to_dict(), "overwrite": True}
    assert set(TRAINING) <= set(built_in.to_dict()) | set(built_in.to_dict()["draft"])


def test_quickstart_runs_end_to_end_and_a_second_run_reuses_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's first command, scaled down; DIR is relative, as the default runs/quickstart is.
    monkeypatch.chdir(tmp_path)
    command = [
        "quickstart", "qs", "--train-rows", "8", "--heldout-prompts", "2", "--max-steps", "2",
        "--max-new-tokens", "8", "--json", "--no-progress",
    ]  # fmt: skip
    assert cli_main(command) == 0
    first = capsys.readouterr().out
    figures = json.loads((tmp_path / "qs" / "heldout.json").read_text())
    assert figures["prompts"] == 2 and figures["identical"] == 2  # greedy speculative == plain
    assert figures["tau_pooled"] >= 1.0 and len(figures["accept_rate"]) == 6
    assert figures["speedup_pooled"] > 0 and figures["speedup_median"] > 0 and figures["batch_size"] >= 1
    assert "target: installed" in first and "data: wrote" in first
    export = tmp_path / "qs" / "run" / "draft" / "model.safetensors"
    trained_at = export.stat().st_mtime_ns

    assert cli_main(command) == 0
    second = capsys.readouterr().out
    assert "target: reusing" in second and "data: reusing" in second and "draft: reusing" in second
    assert export.stat().st_mtime_ns == trained_at
    assert json.loads((tmp_path / "qs" / "heldout.json").read_text())["identical"] == 2
