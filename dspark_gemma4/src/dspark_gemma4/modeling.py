"""``Gemma4DSparkModel``: the DSpark draft for Gemma 4 targets, on core's own-layers path.

Core's :class:`~dspark_core.modeling.draft.DSparkDraftModel` owns the heads, masks, objective,
decoding and the context projection; this module supplies what Gemma 4 changes in the layer, with the
arithmetic and state-dict keys of DeepSpec's ``deepspec/modeling/dspark/gemma4/modeling.py``:

- Gemma's RMSNorm (normalised and scaled in float32; ``v_norm`` has no scale and no weight);
- a word embedding scaled by ``sqrt(hidden_size)`` (rounded to the weight's dtype, as the target's);
- every draft layer is a full-attention layer of the target's shape: ``global_head_dim``, and with
  ``attention_k_eq_v`` the ``num_global_key_value_heads`` key heads whose projection is also the
  values' (no ``v_proj``), rope from ``rope_parameters["full_attention"]``;
- attention scaling 1.0 (q/k norms fix the scale), four norms per layer and a ``layer_scalar``;
- the target's ``final_logit_softcapping`` on the ``lm_head`` logits (core applies it from the config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from dspark_core.modeling.attention import RotaryEmbedding, apply_rotary, context_block_attention
from dspark_core.modeling.draft import DraftKVCache, DSparkDraftModel
from dspark_gemma4.config import (
    FULL_ATTENTION,
    Gemma4DSparkTextConfig,
    build_draft_config,
    draft_config_class,
    global_attention_shape,
)

__all__ = [
    "Gemma4DSparkAttention",
    "Gemma4DSparkDecoderLayer",
    "Gemma4DSparkModel",
    "Gemma4RMSNorm",
    "ScaledWordEmbedding",
]

#: ``(cos, sin)``, each ``[b, T, head_dim]``.
Rope = tuple[Tensor, Tensor]


class Gemma4RMSNorm(nn.Module):
    """``x * (mean(x^2) + eps)^-0.5 * weight``, all in float32, cast back to the input dtype."""

    def __init__(self, size: int, eps: float = 1e-6, *, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(size))

    def forward(self, hidden: Tensor) -> Tensor:
        x = hidden.float()
        normed = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            normed = normed * self.weight.float()
        return normed.type_as(hidden)


class ScaledWordEmbedding(nn.Embedding):
    """An embedding multiplied by ``scale`` rounded to the weight's dtype (the target's arithmetic)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: Tensor) -> Tensor:
        factor = torch.tensor(self.scale, dtype=torch.float32, device=self.weight.device)
        return super().forward(input_ids) * factor.to(self.weight.dtype)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the config's ``hidden_activation``, no biases."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, inner = int(config.hidden_size), int(config.intermediate_size)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out


class Gemma4DSparkAttention(nn.Module):
    """Block queries over ``[context ; block]`` keys and values, Gemma 4 full-attention style."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.num_heads = int(config.num_attention_heads)
        self.head_dim, self.num_kv_heads = global_attention_shape(config)
        self.keys_are_values = bool(getattr(config, "attention_k_eq_v", False))
        bias = bool(getattr(config, "attention_bias", False))
        hidden = int(config.hidden_size)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj: nn.Linear | None = None
        if not self.keys_are_values:
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def _keys_values(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        shape = (b, t, self.num_kv_heads, self.head_dim)
        raw_keys = self.k_proj(x).view(shape)
        # With attention_k_eq_v the values are the keys' projection before k_norm and rope.
        raw_values = raw_keys if self.v_proj is None else self.v_proj(x).view(shape)
        keys = apply_rotary(self.k_norm(raw_keys).transpose(1, 2), *rope)
        return keys, self.v_norm(raw_values).transpose(1, 2)

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
        queries = self.q_norm(self.q_proj(hidden).view(b, q_len, self.num_heads, self.head_dim))
        queries = apply_rotary(queries.transpose(1, 2), *block_rope)
        out = context_block_attention(
            queries,
            self._keys_values(hidden, block_rope),
            self._keys_values(context, context_rope),
            mask,
            cache=cache,
            layer_index=layer_index,
            implementation=self.config._attn_implementation or "sdpa",
            scaling=1.0,
        )
        projected: Tensor = self.o_proj(out.reshape(b, q_len, -1))
        return projected


class Gemma4DSparkDecoderLayer(nn.Module):
    """Sandwich-normed attention and MLP, then ``layer_scalar`` (a saved ``[1]`` buffer)."""

    layer_scalar: Tensor

    def __init__(self, config: Any) -> None:
        super().__init__()
        size, eps = int(config.hidden_size), config.rms_norm_eps
        self.self_attn = Gemma4DSparkAttention(config)
        self.mlp = GatedMLP(config)
        self.input_layernorm = Gemma4RMSNorm(size, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(size, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(size, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

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
        hidden = hidden + self.post_attention_layernorm(attended)
        hidden = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        return hidden * self.layer_scalar


class Gemma4DSparkModel(DSparkDraftModel):
    """The DSpark draft for Gemma 4 targets, with the published ``Gemma4DSparkModel`` layout."""

    config_class = Gemma4DSparkTextConfig

    def make_embedding(self, config: PretrainedConfig) -> nn.Embedding:
        return ScaledWordEmbedding(config.vocab_size, config.hidden_size, float(config.hidden_size) ** 0.5)

    def build_layers(self, config: PretrainedConfig) -> nn.ModuleList:
        return nn.ModuleList(Gemma4DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def make_norm(self, config: PretrainedConfig) -> nn.Module:
        return Gemma4RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_rotary(self, config: PretrainedConfig) -> nn.Module:
        head_dim, _ = global_attention_shape(config)
        return RotaryEmbedding(config, layer_type=FULL_ATTENTION, head_dim=head_dim)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Gemma4DSparkDecoderLayer):
            module.layer_scalar.fill_(1.0)
        super()._init_weights(module)

    @classmethod
    def config_from_target(cls, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        return build_draft_config(target_config, **options)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """Core's ``from_pretrained``, with the config class the saved ``model_type`` names
        (``gemma4_text`` or ``gemma4_unified_text``)."""
        config_path = Path(pretrained_model_name_or_path) / "config.json"
        if kwargs.get("config") is None and config_path.is_file():
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type", "gemma4_text")
            kwargs["config"] = draft_config_class(model_type).from_pretrained(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
