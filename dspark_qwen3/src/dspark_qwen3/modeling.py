"""``Qwen3DSparkModel``: the DSpark draft for Qwen3 targets. Only the Qwen3 backbone is here;
the heads, masks, objective and decoding come from :mod:`dspark_core.modeling`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from dspark_core.modeling.attention import apply_rotary, block_attention
from dspark_core.modeling.draft import DraftKVCache, DSparkDraftModel
from dspark_qwen3.config import build_draft_config

Rope = tuple[Tensor, Tensor]


class Qwen3DSparkAttention(nn.Module):
    """Queries from the block; keys and values from ``[context ; block]`` (Qwen3 q/k norms, RoPE)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.scaling = self.head_dim**-0.5
        self.config = config
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _keys_values(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        keys = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        values = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(keys, *rope), values

    def forward(
        self,
        hidden: Tensor,
        context: Tensor,
        block_rope: Rope,
        context_rope: Rope,
        mask: Any,
        cache: DraftKVCache | None,
        layer_index: int,
    ) -> Tensor:
        b, q_len, _ = hidden.shape
        queries = self.q_norm(self.q_proj(hidden).view(b, q_len, self.num_heads, self.head_dim)).transpose(
            1, 2
        )
        queries = apply_rotary(queries, *block_rope)
        block_keys, block_values = self._keys_values(hidden, block_rope)
        context_keys, context_values = self._keys_values(context, context_rope)
        if cache is not None:
            context_keys, context_values = cache.extend(layer_index, context_keys, context_values)
        keys = torch.cat([context_keys, block_keys], dim=2)
        values = torch.cat([context_values, block_values], dim=2)
        out = block_attention(
            queries,
            keys,
            values,
            mask,
            implementation=self.config._attn_implementation or "sdpa",
            scaling=self.scaling,
        )
        projected: Tensor = self.o_proj(out.reshape(b, q_len, -1))
        return projected


class Qwen3DSparkDecoderLayer(nn.Module):
    """Pre-norm Qwen3 layer; the context is already normed (``hidden_norm``) and is not re-normed."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.self_attn = Qwen3DSparkAttention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: Tensor,
        context: Tensor,
        block_rope: Rope,
        context_rope: Rope,
        mask: Any,
        cache: DraftKVCache | None,
        layer_index: int,
    ) -> Tensor:
        attended = self.self_attn(
            self.input_layernorm(hidden), context, block_rope, context_rope, mask, cache, layer_index
        )
        hidden = hidden + attended
        out: Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return out


class Qwen3DSparkModel(DSparkDraftModel):
    """The DSpark draft for Qwen3 and Qwen3-MoE targets, with the published checkpoint layout."""

    config_class = Qwen3Config

    def build_layers(self, config: PretrainedConfig) -> nn.ModuleList:
        return nn.ModuleList(Qwen3DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))  # type: ignore[arg-type]

    def make_norm(self, config: PretrainedConfig) -> nn.Module:
        return Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @classmethod
    def config_from_target(cls, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        return build_draft_config(target_config, **options)
