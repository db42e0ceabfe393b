"""The standard DSpark decoder backbone, which a family declares rather than writes.

Pre-norm layers of GQA attention from the block to ``[context ; block]`` (RoPE of any static type
transformers knows, optional per-head q/k RMSNorm, optional projection biases, the draft KV cache
extended with context rows only) and a SwiGLU MLP. The module and parameter names are the published
DSpark checkpoint layout (``layers.{i}.self_attn.q_proj`` ...), so a family on this backbone saves
and loads the same keys as ``Qwen3DSparkModel``.

A family subclasses :class:`StandardDSparkModel` and sets two class attributes::

    class LlamaDSparkModel(StandardDSparkModel):
        family = DraftFamily("dspark-llama", LlamaConfig, ("llama",), "LlamaDSparkModel")
        qk_norm = False

A family whose layers really differ (a sliding window, another norm) subclasses
:class:`~dspark_core.modeling.draft.DSparkDraftModel` and writes its own ``build_layers``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.attention import apply_rotary, context_block_attention
from dspark_core.modeling.draft import DraftKVCache, DSparkDraftModel
from dspark_core.modeling.draft_config import DraftFamily

__all__ = [
    "DSparkAttention",
    "DSparkDecoderLayer",
    "RMSNorm",
    "Rope",
    "StandardDSparkModel",
    "SwiGLUMLP",
]

#: ``(cos, sin)``, each ``[b, T, head_dim]``.
Rope = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and scaled in the input dtype (the Qwen3/Llama arithmetic)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden: Tensor) -> Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        out: Tensor = self.weight * hidden.to(input_dtype)
        return out

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class SwiGLUMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; biases iff the config's ``mlp_bias`` (absent: none)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, inner = int(config.hidden_size), int(config.intermediate_size)
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out


class DSparkAttention(nn.Module):
    """Queries from the block; keys and values from ``[context ; block]``, with GQA and RoPE.

    Projection biases iff the config's ``attention_bias``; per-head q/k RMSNorm iff ``qk_norm``
    (without it ``q_norm``/``k_norm`` are identities and hold no weights).
    """

    def __init__(self, config: Any, *, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.scaling = self.head_dim**-0.5
        self.config = config
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm: nn.Module = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()

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
            scaling=self.scaling,
        )
        projected: Tensor = self.o_proj(out.reshape(b, q_len, -1))
        return projected


class DSparkDecoderLayer(nn.Module):
    """Pre-norm layer; the context is already normed (``hidden_norm``) and is not normed again."""

    def __init__(self, config: Any, *, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = DSparkAttention(config, qk_norm=qk_norm)
        self.mlp = SwiGLUMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

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


class StandardDSparkModel(DSparkDraftModel):
    """A DSpark draft on the standard backbone. Subclasses set :attr:`family` (and :attr:`qk_norm`);
    ``config_class`` defaults to the family's, ``config_from_target`` is the family's builder."""

    #: How the family builds draft configs from its targets' configs.
    family: ClassVar[DraftFamily | None] = None
    #: Per-head RMSNorm of queries and keys (Qwen3 has it, Llama does not).
    qk_norm: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        declared = cls.__dict__.get("config_class") is not None
        super().__init_subclass__(**kwargs)
        if not declared and cls.family is not None:
            # from_pretrained needs config_class; a family would otherwise have to repeat it.
            cls.config_class = cls.family.config_class

    def build_layers(self, config: PretrainedConfig) -> nn.ModuleList:
        return nn.ModuleList(
            DSparkDecoderLayer(config, qk_norm=self.qk_norm) for _ in range(config.num_hidden_layers)
        )

    def make_norm(self, config: PretrainedConfig) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps)

    @classmethod
    def config_from_target(cls, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        if cls.family is None:
            raise DraftConfigError(
                f"{cls.__name__} sets no `family`: declare family = DraftFamily(...) on the class "
                "(see dspark_core.modeling.draft_config.DraftFamily)"
            )
        config: PretrainedConfig = cls.family.build_config(target_config, **options)
        return config
