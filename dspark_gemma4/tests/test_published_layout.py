"""The draft's state-dict keys, shapes and config fields against the published Gemma 4 DSpark layout.

The draft is built on the meta device (no weights) for a Gemma 4 12B target with DeepSpec's
``config/dspark/dspark_gemma4_12b.py`` options: block 7, 5 draft layers, target layers
[5, 17, 29, 41, 46], mask token 4, Markov rank 256 vanilla, confidence head with Markov. The expected
layout is written out from DeepSpec's ``deepspec/modeling/dspark/gemma4/modeling.py`` (one entry per
module it creates), never from our own model.

The 12B's text config: 48 layers, hidden 3840, 16 heads of ``global_head_dim`` 512 on the full layers,
vocabulary 262144, sliding window 1024, final logit soft cap 30, tied embeddings, 5:1 sliding:full, a
``gemma4_unified`` top level (its model card and conversions). Not published there, so chosen here and
only scaling shapes: the sliding head_dim 256, 8 key/value heads (4 global, ``attention_k_eq_v``) and
the MLP width 15360.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma4Config, Gemma4TextConfig
from transformers.models.gemma4_unified.configuration_gemma4_unified import (
    Gemma4UnifiedConfig,
    Gemma4UnifiedTextConfig,
)

from dspark_core.errors import DraftConfigError
from dspark_gemma4.config import build_draft_config, draft_config_class
from dspark_gemma4.modeling import Gemma4DSparkModel

HIDDEN, VOCAB, HEADS, GLOBAL_HEAD_DIM, GLOBAL_KV, FFN = 3840, 262144, 16, 512, 4, 15360
DEEPSPEC_12B_OPTIONS: dict[str, Any] = {
    "block_size": 7,
    "num_draft_layers": 5,
    "target_layer_ids": [5, 17, 29, 41, 46],
    "mask_token_id": 4,
    "num_anchors": 512,
    "markov_rank": 256,
    "markov_head_type": "vanilla",
    "enable_confidence_head": True,  # confidence_head_alpha=1.0 > 0
    "confidence_head_with_markov": True,
}


def text_fields() -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 48,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": GLOBAL_HEAD_DIM,
        "num_global_key_value_heads": GLOBAL_KV,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": True,
    }


def unified_12b() -> Gemma4UnifiedConfig:
    text = Gemma4UnifiedTextConfig(**text_fields())
    return Gemma4UnifiedConfig(
        text_config=text, architectures=["Gemma4UnifiedForConditionalGeneration"], tie_word_embeddings=True
    )


def gemma4_12b_shape() -> Gemma4Config:
    text = Gemma4TextConfig(**text_fields(), hidden_size_per_layer_input=0)
    return Gemma4Config(text_config=text, architectures=["Gemma4ForConditionalGeneration"])


def published_layout(*, layers: int, features: int, rank: int) -> dict[str, tuple[int, ...]]:
    """DeepSpec's Gemma4DSparkModel, module by module (k_eq_v: no v_proj; v_norm has no weight)."""
    keys: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (VOCAB, HIDDEN),
        "norm.weight": (HIDDEN,),
        "fc.weight": (HIDDEN, features * HIDDEN),
        "hidden_norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
        "markov_head.markov_w1.weight": (VOCAB, rank),
        "markov_head.markov_w2.weight": (VOCAB, rank),
        "confidence_head.proj.weight": (1, HIDDEN + rank),
        "confidence_head.proj.bias": (1,),
    }
    q_width, kv_width = HEADS * GLOBAL_HEAD_DIM, GLOBAL_KV * GLOBAL_HEAD_DIM
    for i in range(layers):
        keys |= {
            f"layers.{i}.layer_scalar": (1,),
            f"layers.{i}.self_attn.q_proj.weight": (q_width, HIDDEN),
            f"layers.{i}.self_attn.k_proj.weight": (kv_width, HIDDEN),
            f"layers.{i}.self_attn.o_proj.weight": (HIDDEN, q_width),
            f"layers.{i}.self_attn.q_norm.weight": (GLOBAL_HEAD_DIM,),
            f"layers.{i}.self_attn.k_norm.weight": (GLOBAL_HEAD_DIM,),
            f"layers.{i}.mlp.gate_proj.weight": (FFN, HIDDEN),
            f"layers.{i}.mlp.up_proj.weight": (FFN, HIDDEN),
            f"layers.{i}.mlp.down_proj.weight": (HIDDEN, FFN),
        }
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            keys[f"layers.{i}.{norm}_layernorm.weight"] = (HIDDEN,)
    return keys


def meta_draft(config: Any) -> Gemma4DSparkModel:
    with torch.device("meta"):
        return Gemma4DSparkModel(config)


@pytest.fixture(scope="module")
def draft_12b() -> Gemma4DSparkModel:
    config = Gemma4DSparkModel.config_from_target(unified_12b(), **DEEPSPEC_12B_OPTIONS)
    return meta_draft(config)


def test_state_dict_keys_and_shapes_are_the_published_layout(draft_12b: Gemma4DSparkModel) -> None:
    got = {name: tuple(tensor.shape) for name, tensor in draft_12b.state_dict().items()}
    assert got == published_layout(layers=5, features=5, rank=256)


def test_config_fields_are_deepspecs(draft_12b: Gemma4DSparkModel) -> None:
    saved = draft_12b.config.to_dict()
    expected = {
        "model_type": "gemma4_unified_text",
        "architectures": ["Gemma4DSparkModel"],
        "target_model_type": "gemma4_unified",
        "target_text_model_type": "gemma4_unified_text",
        "num_hidden_layers": 5,
        "num_target_layers": 48,
        "layer_types": ["full_attention"] * 5,
        "block_size": 7,
        "mask_token_id": 4,
        "target_layer_ids": [5, 17, 29, 41, 46],
        "num_anchors": 512,
        "markov_rank": 256,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "tie_word_embeddings": False,
        # copied from the target's text config, as DeepSpec's deepcopy does
        "global_head_dim": GLOBAL_HEAD_DIM,
        "num_global_key_value_heads": GLOBAL_KV,
        "head_dim": 256,
        "num_key_value_heads": 8,
        "attention_k_eq_v": True,
        "final_logit_softcapping": 30.0,
        "sliding_window": 1024,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
    }
    assert {name: saved.get(name) for name in expected} == expected
    assert "per_layer_config" not in saved  # the published (transformers 5.10) form


def test_saved_config_reads_back_to_the_same_layout(draft_12b: Gemma4DSparkModel, tmp_path: Path) -> None:
    draft_12b.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["global_head_dim"] == GLOBAL_HEAD_DIM and "per_layer_config" not in written
    reloaded = draft_config_class(written["model_type"]).from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Gemma4UnifiedDSparkTextConfig"
    assert {k: tuple(v.shape) for k, v in meta_draft(reloaded).state_dict().items()} == published_layout(
        layers=5, features=5, rank=256
    )


def test_a_transformers_5_10_config_json_builds_the_same_layout(
    draft_12b: Gemma4DSparkModel, tmp_path: Path
) -> None:
    """DeepSpec saves under transformers 5.10, whose rope_parameters carry top-level defaults too."""
    written = draft_12b.config.to_dict()
    written["rope_parameters"] |= {"rope_theta": None, "rope_type": "default"}
    written["transformers_version"] = "5.10.2"
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = draft_config_class(written["model_type"]).from_pretrained(tmp_path)
    layout = {k: tuple(v.shape) for k, v in meta_draft(config).state_dict().items()}
    assert layout == published_layout(layers=5, features=5, rank=256)


def test_a_gemma4_target_gives_a_gemma4_text_draft() -> None:
    config = build_draft_config(gemma4_12b_shape(), **DEEPSPEC_12B_OPTIONS)
    assert (config.model_type, config.target_model_type) == ("gemma4_text", "gemma4")
    assert type(config).__name__ == "Gemma4DSparkTextConfig"
    layout = {k: tuple(v.shape) for k, v in meta_draft(config).state_dict().items()}
    assert layout == published_layout(layers=5, features=5, rank=256)


def test_the_text_stack_alone_is_a_target_too() -> None:
    text = gemma4_12b_shape().text_config
    config = build_draft_config(text, **DEEPSPEC_12B_OPTIONS)
    assert (config.target_model_type, config.target_text_model_type) == ("gemma4_text", "gemma4_text")


def test_without_k_eq_v_values_have_their_own_projection() -> None:
    fields = text_fields() | {"attention_k_eq_v": False}
    text = Gemma4TextConfig(**fields, hidden_size_per_layer_input=0)
    config = build_draft_config(Gemma4Config(text_config=text), **DEEPSPEC_12B_OPTIONS)
    shapes = {k: tuple(v.shape) for k, v in meta_draft(config).state_dict().items()}
    # DeepSpec then uses num_key_value_heads (8), not the global count, with global_head_dim.
    assert shapes["layers.0.self_attn.v_proj.weight"] == shapes["layers.0.self_attn.k_proj.weight"]
    assert shapes["layers.0.self_attn.k_proj.weight"] == (8 * GLOBAL_HEAD_DIM, HIDDEN)
    assert config.to_dict()["num_global_key_value_heads"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("enable_moe_block", True), ("hidden_size_per_layer_input", 256)],
)
def test_unsupported_targets_are_refused_by_name(field: str, value: Any) -> None:
    text = Gemma4TextConfig(**(text_fields() | {"hidden_size_per_layer_input": 0, field: value}))
    with pytest.raises(DraftConfigError, match=field):
        build_draft_config(Gemma4Config(text_config=text), **DEEPSPEC_12B_OPTIONS)


def test_another_family_is_refused() -> None:
    from transformers import Qwen3Config

    with pytest.raises(DraftConfigError, match=r"dspark-gemma4 .*model_type 'qwen3'"):
        build_draft_config(Qwen3Config(), **DEEPSPEC_12B_OPTIONS)
