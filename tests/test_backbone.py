"""Core's standard backbone as a family declares it: RoPE of every type transformers knows, the
q/k-norm and bias flags, a derived ``config_class``, checkpoints and train/decode agreement for a
family other than Qwen3 (a Llama declaration written here, as a third party would)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from qwen3_draft_helpers import randomize_
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.attention import RotaryEmbedding
from dspark_core.modeling.backbone import StandardDSparkModel
from dspark_core.modeling.draft_config import STANDARD_BACKBONE_FIELDS, DraftFamily

HIDDEN, HEADS, KV_HEADS, VOCAB, MASK = 32, 4, 2, 80, 79
HALF = HIDDEN // HEADS // 2

LLAMA_FAMILY = DraftFamily(
    "dspark-llama-test", LlamaConfig, ("llama",), "LlamaTestDraft", (*STANDARD_BACKBONE_FIELDS, "mlp_bias")
)


class LlamaTestDraft(StandardDSparkModel):
    family = LLAMA_FAMILY
    qk_norm = False


#: Parameters for each RoPE type (sizes fit a tiny model with max_position_embeddings 256).
ROPE_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 128},
    "longrope": {
        "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
        "long_factor": [2.0 + 0.3 * i for i in range(HALF)],
        "original_max_position_embeddings": 128,
    },
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "proportional": {"factor": 1.5},
}


def llama_config(rope_type: str = "default", **overrides: Any) -> LlamaConfig:
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_CASES[rope_type]},
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def draft(seed: int = 0, target: LlamaConfig | None = None, **options: Any) -> LlamaTestDraft:
    settings: dict[str, Any] = {
        "num_draft_layers": 2,
        "block_size": 4,
        "target_layer_ids": [0, 2],
        "mask_token_id": MASK,
        "num_anchors": 3,
        "markov_rank": 8,
    }
    settings.update(options)
    config = LlamaTestDraft.config_from_target(target or llama_config("llama3"), **settings)
    config._attn_implementation = "sdpa"
    model = LlamaTestDraft(config)
    randomize_(model, seed)
    return model.eval()


def test_the_rope_types_transformers_knows_are_all_covered() -> None:
    assert set(ROPE_CASES) == {"default", *ROPE_INIT_FUNCTIONS}


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
def test_rope_matches_transformers_for_every_type(rope_type: str) -> None:
    config = llama_config(rope_type)
    ours = RotaryEmbedding(config)
    theirs = LlamaRotaryEmbedding(config)
    positions = torch.arange(0, 120).unsqueeze(0)  # within every type's original context
    cos, sin = ours(positions, torch.float32)
    ref_cos, ref_sin = theirs(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=1e-6)
    plain_cos, _ = RotaryEmbedding(llama_config("default"))(positions, torch.float32)
    if rope_type in ("default", "dynamic"):
        # dynamic NTK only re-scales past max_position_embeddings: inside it, it is the default
        torch.testing.assert_close(cos, plain_cos, atol=1e-6, rtol=1e-6)
    else:
        assert (plain_cos - cos).abs().max() > 1e-3  # not the default frequencies in disguise


def test_unknown_rope_type_and_partial_rotary_are_clear_errors() -> None:
    config = llama_config()
    config.rope_parameters = {"rope_type": "warp", "rope_theta": 10000.0}
    with pytest.raises(DraftConfigError, match=r"rope_type.*warp"):
        RotaryEmbedding(config)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(DraftConfigError, match="partial_rotary_factor"):
        RotaryEmbedding(config)


def test_a_declared_family_gets_its_config_class_layout_and_flags() -> None:
    assert LlamaTestDraft.config_class is LlamaConfig
    model = draft(target=llama_config("llama3", mlp_bias=True, attention_bias=True))
    config = model.config
    assert type(config) is LlamaConfig and config.architectures == ["LlamaTestDraft"]
    assert config.rope_parameters["rope_type"] == "llama3" and config.mlp_bias is True
    keys = set(model.state_dict())
    assert not any("q_norm" in k or "k_norm" in k for k in keys)  # qk_norm = False
    assert {"layers.1.mlp.down_proj.bias", "layers.1.self_attn.o_proj.bias"} <= keys
    plain = set(draft().state_dict())
    assert "layers.0.mlp.up_proj.bias" not in plain and "layers.0.self_attn.q_proj.bias" not in plain
    with pytest.raises(DraftConfigError, match=r"dspark-llama-test.*model_type.*'qwen3'"):
        LLAMA_FAMILY.build_config(type("Cfg", (), {"model_type": "qwen3"})(), mask_token_id=MASK)
    with pytest.raises(DraftConfigError, match="num_anchor"):
        LLAMA_FAMILY.build_config(llama_config(), mask_token_id=MASK, num_anchor=3)


def test_a_model_without_a_family_says_what_to_declare() -> None:
    class Bare(StandardDSparkModel):
        pass

    with pytest.raises(DraftConfigError, match="family"):
        Bare.config_from_target(llama_config(), mask_token_id=MASK)


def test_declared_family_round_trips_and_training_agrees_with_decoding(tmp_path: Path) -> None:
    model = draft(seed=4)
    gen = torch.Generator().manual_seed(5)
    seq = 20
    ids = torch.randint(2, MASK, (1, seq), generator=gen)
    features = torch.randn(1, seq, 2 * HIDDEN, generator=gen)
    final = torch.randn(1, seq, HIDDEN, generator=gen)
    anchors = torch.tensor([[3, 9, 14]])
    with torch.no_grad():
        out = model(ids, features, final, torch.ones_like(ids), anchors=anchors, return_logits=True)
    assert out.logits is not None
    model.save_pretrained(tmp_path)
    loaded = LlamaTestDraft.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    cache, start = loaded.new_cache(), 0
    for n, a in enumerate(anchors[0].tolist()):
        with torch.no_grad():
            hidden = loaded.block_hidden(ids[:, a], features[:, start:a], cache)
            latent = loaded.markov_head.latent_block(hidden, ids[:, a : a + 4])  # type: ignore[union-attr]
            logits = loaded.block_logits(hidden, latent)
        torch.testing.assert_close(logits, out.logits[:, n], atol=2e-5, rtol=2e-5)
        start = a
