"""Attention kernels and rotary embeddings shared by every draft backbone.

A draft layer attends from the block's queries to ``[context ; block]`` keys, under a mask from
:mod:`dspark_core.modeling.masks` (or none at decode time). Three paths give the same result:
``sdpa`` (CPU and GPU), ``eager`` (reference, fp32 softmax) and ``flex_attention`` (CUDA training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dspark_core.errors import DraftConfigError

if TYPE_CHECKING:
    from dspark_core.modeling.draft import DraftKVCache

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@functools.cache
def _compiled_flex_attention() -> Callable[..., Any]:
    # Uncompiled flex attention materialises the full score matrix; compile it once per process.
    return torch.compile(flex_attention, dynamic=False)


def block_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | BlockMask | None,
    *,
    implementation: str,
    scaling: float,
) -> Tensor:
    """Attention of ``query [b, h, Q, d]`` over ``key``/``value [b, kv_h, K, d]`` (grouped heads).

    ``mask`` is an additive float mask ``[b, 1, Q, K]`` for ``sdpa``/``eager``, a ``BlockMask`` for
    ``flex_attention``, or ``None`` for full attention. Returns ``[b, Q, h, d]``.
    """
    groups = query.shape[1] // key.shape[1]
    if implementation == "flex_attention":
        if mask is not None and not isinstance(mask, BlockMask):
            raise TypeError(
                "flex_attention needs a BlockMask (see dspark_core.modeling.masks.flex_block_mask)"
            )
        kernel: Any = _compiled_flex_attention() if query.is_cuda else flex_attention
        out: Tensor = kernel(query, key, value, block_mask=mask, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2)
    if isinstance(mask, BlockMask):
        raise TypeError(f"{implementation} attention needs a dense additive mask, not a BlockMask")
    if implementation == "sdpa":
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2)
    if implementation == "eager":
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2)
    raise DraftConfigError(
        f"attention implementation {implementation!r} is not supported by DSpark drafts; "
        f"use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
    )


def context_block_attention(
    query: Tensor,
    block_keys_values: tuple[Tensor, Tensor],
    context_keys_values: tuple[Tensor, Tensor],
    mask: Tensor | BlockMask | None,
    *,
    cache: DraftKVCache | None,
    layer_index: int,
    implementation: str,
    scaling: float,
) -> Tensor:
    """The draft layer's attention: the block's ``query`` over ``[context ; block]`` keys and values.

    With a decode-time ``cache`` the context keys/values are appended to layer ``layer_index``'s
    cache first and the whole cached context is attended; the block's own keys are never cached.
    Every family's layers call this, so the cache contract lives in one place. Returns ``[b, Q, h, d]``.
    """
    context_keys, context_values = context_keys_values
    if cache is not None:
        context_keys, context_values = cache.extend(layer_index, context_keys, context_values)
    block_keys, block_values = block_keys_values
    return block_attention(
        query,
        torch.cat([context_keys, block_keys], dim=2),
        torch.cat([context_values, block_values], dim=2),
        mask,
        implementation=implementation,
        scaling=scaling,
    )


_PARTIAL_ROTARY = (
    "`rope_parameters.partial_rotary_factor` below 1 (RoPE on part of each head) is not supported by the "
    "DSpark backbone; a family with partial rotary must write its own layers and rotary embedding"
)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [b, h, T, d]`` by ``cos``/``sin [b, T, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """RoPE whose ``inv_freq`` stays float32 whatever the model is cast to.

    ``rope_parameters.rope_type`` may be ``default`` or any type in transformers'
    ``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn, longrope, llama3, proportional), whose frequencies
    and attention scaling come from transformers itself. They are computed once, as transformers does
    for sequences within the original context: ``dynamic`` and ``longrope`` do not re-scale as a
    sequence grows, so training and decoding see the same frequencies at every position.

    ``layer_type`` reads ``rope_parameters[layer_type]`` of a config whose rope parameters are keyed by
    layer type (Gemma 3/4), and ``head_dim`` overrides ``config.head_dim`` (a draft whose layers use
    the target's full-attention head size, Gemma 4's ``global_head_dim``).

    A bf16 ``inv_freq`` drifts in phase as positions grow, which lowers acceptance, so every
    ``.to(dtype)``/``.half()`` recomputes the frequencies in float32 (on the buffer's device).
    """

    inv_freq: Tensor

    def __init__(self, config: Any, *, layer_type: str | None = None, head_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        self.head_dim_override = head_dim
        inv_freq, self.attention_scaling = self._frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _head_dim(self) -> int:
        dim = self.head_dim_override or getattr(self.config, "head_dim", None)
        return int(dim or self.config.hidden_size // self.config.num_attention_heads)

    def _layer_rope_parameters(self) -> dict[str, Any]:
        parameters = getattr(self.config, "rope_parameters", None) or {}
        if self.layer_type is None:
            return dict(parameters)
        if self.layer_type not in parameters:
            raise DraftConfigError(
                f"`rope_parameters` has no entry for layer type {self.layer_type!r} "
                f"(it has {', '.join(map(repr, parameters)) or 'none'})"
            )
        return dict(parameters[self.layer_type] or {})

    def _frequencies(self) -> tuple[Tensor, float]:
        parameters = self._layer_rope_parameters()
        rope_type = parameters.get("rope_type", "default")
        dim = self._head_dim()
        if rope_type == "default":
            if float(parameters.get("partial_rotary_factor", 1.0)) != 1.0:
                raise DraftConfigError(_PARTIAL_ROTARY)
            base = float(parameters.get("rope_theta", getattr(self.config, "rope_theta", 10000.0)))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            return inv_freq.float(), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS.get(rope_type)
        if init is None:
            raise DraftConfigError(
                f"`rope_parameters.rope_type` {rope_type!r} is unknown to this transformers; the draft "
                f"supports default, {', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        # transformers reads a layer type's parameters (and head size) itself given layer_type
        extra = {} if self.layer_type is None else {"layer_type": self.layer_type}
        inv_freq, scaling = init(self.config, None, **extra)
        if 2 * inv_freq.numel() != dim:
            raise DraftConfigError(_PARTIAL_ROTARY)
        return inv_freq.float(), float(scaling)

    def reset_frequencies(self) -> None:
        device = self.inv_freq.device
        if device.type == "meta":
            return
        self.inv_freq = self._frequencies()[0].to(device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        self.reset_frequencies()
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``[b, T, d]`` for ``position_ids [b, T]``, computed in float32."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
