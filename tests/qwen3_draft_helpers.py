"""Tiny Qwen3 target configs, drafts and inputs shared by the Qwen3 draft model tests.

Not a test module (no ``test_`` prefix): the draft test files import it from the tests folder.
Sizes follow the method's tiny test shape: hidden 32, 4 target layers, 4 heads, 2 KV heads,
head_dim 8, a vocabulary of 96 with pad 0, eos 1 and the last id as the mask token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import Qwen3Config, Qwen3MoeConfig

from dspark_qwen3.config import build_draft_config
from dspark_qwen3.modeling import Qwen3DSparkModel

VOCAB = 96
HIDDEN = 32
TARGET_LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
PAD = 0
EOS = 1
MASK = VOCAB - 1
# Neither -1 nor n-1, so that the SGLang warning is not raised where it is not under test.
LAYER_IDS = [0, 2]
HEAD_TYPES = ("vanilla", "gated", "rnn")


def target_config(*, moe: bool = False, **overrides: Any) -> Qwen3Config | Qwen3MoeConfig:
    """A tiny Qwen3 (or Qwen3-MoE) target config."""
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": TARGET_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": EOS,
    }
    if moe:
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN // 2)
        fields.update(overrides)
        return Qwen3MoeConfig(**fields)
    fields.update(overrides)
    return Qwen3Config(**fields)


def draft_options(**overrides: Any) -> dict[str, Any]:
    """Draft options for the tiny target: 2 layers, B=4, N=4, r=8, confidence head with Markov."""
    options: dict[str, Any] = {
        "num_draft_layers": 2,
        "block_size": 4,
        "target_layer_ids": list(LAYER_IDS),
        "mask_token_id": MASK,
        "num_anchors": 4,
        "markov_rank": 8,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
    }
    options.update(overrides)
    return options


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter O(1) random values, so that outputs depend visibly on each input.

    The default init (std 0.02, unit norms) makes a tiny draft's logits nearly flat, which would let
    a comparison pass for the wrong reason.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif param.dim() == 1:  # biases
                value = 0.1 * noise
            else:
                fan_in = param.shape[-1] if name.endswith(".weight") and "embed" not in name else 1
                value = noise / max(fan_in, 1) ** 0.5
                if "markov_w1" in name or "embed_tokens" in name:
                    value = noise
            param.copy_(value.to(param.dtype))


def make_draft(
    *, seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides: Any
) -> Qwen3DSparkModel:
    """A randomly initialised tiny draft (all parameters O(1)) in eval mode."""
    config = build_draft_config(target_config(), **draft_options(**overrides))
    config._attn_implementation = attn
    model = Qwen3DSparkModel(config)
    randomize_(model, seed)
    return model.to(dtype).eval()


@dataclass
class DraftBatch:
    input_ids: Tensor
    target_features: Tensor
    target_final_hidden: Tensor
    loss_mask: Tensor

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.input_ids, self.target_features, self.target_final_hidden, self.loss_mask


def random_batch(
    batch: int,
    seq_len: int,
    *,
    seed: int = 0,
    num_layers: int = len(LAYER_IDS),
    dtype: torch.dtype = torch.float32,
) -> DraftBatch:
    """Random token ids (never pad, eos or mask), features and final hidden states; loss on everything."""
    gen = torch.Generator().manual_seed(seed)
    return DraftBatch(
        input_ids=torch.randint(2, MASK, (batch, seq_len), generator=gen),
        target_features=torch.randn(batch, seq_len, num_layers * HIDDEN, generator=gen).to(dtype),
        target_final_hidden=torch.randn(batch, seq_len, HIDDEN, generator=gen).to(dtype),
        loss_mask=torch.ones(batch, seq_len, dtype=torch.long),
    )
