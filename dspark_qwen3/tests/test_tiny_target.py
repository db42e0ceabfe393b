"""The plugin side of the embedded targets: the tiny Qwen3 target saves, loads, generates and chats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dspark_qwen3.testing import (
    TINY_MASK_TOKEN,
    TINY_SPECIAL_TOKENS,
    make_tiny_target,
    make_tiny_tokenizer,
    tiny_corpus,
    tiny_target_config,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "target")


def test_saves_safetensors_and_tokenizer(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)


def test_loads_back_and_generates(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    config = model.config
    assert config.vocab_size == len(tokenizer) == 512 + len(TINY_SPECIAL_TOKENS)
    assert config.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eos
    assert config.eos_token_id == config.pad_token_id == config.bos_token_id == eos
    assert (config.hidden_size, config.num_hidden_layers) == (64, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)

    inputs = tokenizer("The morning was cold", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    assert int(out.max()) < config.vocab_size


def test_moe_target_loads_and_generates(tmp_path: Path) -> None:
    path = make_tiny_target(tmp_path / "moe", moe=True, num_layers=2)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3_moe"
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Question: What is 2 plus 3?", return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_chat_template_renders_chatml(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    # The ChatML markers are single special tokens, not spelled out in bytes.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 4


def test_assistant_mask_covers_assistant_content(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "one, two, three"},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "one, two, three"


def test_mask_token_is_reserved_and_unused(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    mask_id = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
    assert TINY_MASK_TOKEN in tokenizer.all_special_tokens
    assert mask_id not in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert 0 <= mask_id < len(tokenizer)
    corpus_ids = tokenizer("\n".join(tiny_corpus()))["input_ids"]
    assert mask_id not in corpus_ids


@pytest.mark.parametrize(
    "text",
    ["plain words", "  leading spaces\n\ttabs", "café ☕ naïve 日本", "x = {'a': [1, 2]}  # done\n"],
)
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = make_tiny_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bpe_learned_merges() -> None:
    tokenizer = make_tiny_tokenizer()
    text = "The answer is that the question was simple."
    # A byte-level tokenizer with no merges would need one token per byte.
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) // 2


def test_deterministic_given_seed(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    a = make_tiny_target(tmp_path / "a", seed=3, num_layers=1)
    b = make_tiny_target(tmp_path / "b", seed=3, num_layers=1)
    c = make_tiny_target(tmp_path / "c", seed=4, num_layers=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the global RNG must be left untouched"
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    vocab_a = json.loads((a / "tokenizer.json").read_text())["model"]
    vocab_b = json.loads((b / "tokenizer.json").read_text())["model"]
    assert vocab_a == vocab_b


def test_custom_sizes(tmp_path: Path) -> None:
    path = make_tiny_target(
        tmp_path / "t", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=300
    )
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.num_key_value_heads, config.head_dim) == (1, 16)
    assert config.vocab_size == 300 + len(TINY_SPECIAL_TOKENS) == len(AutoTokenizer.from_pretrained(path))


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_tokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="only supports"):
        make_tiny_tokenizer(vocab_size=100_000)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_target_config(vocab_size=600, hidden_size=64, num_heads=3)
