"""The DSpark block attention mask (method reference, section 4, "Mask").

Keys and values are laid out as ``[context (S) | block_0 | ... | block_{N-1}]`` and the queries are
the ``N*B`` block slots in order. Query ``(n, k)`` may attend to

- context position ``j`` iff block n is kept, ``j < a_n`` strictly (the anchor's own features are
  never seen, as at decode time) and, when packed, ``j`` is in the anchor's document;
- every slot of its own block, in both directions, also when the block is not kept, so that no
  row is fully masked (a fully masked SDPA row gives NaN);
- nothing else.

:func:`_allowed_rule` is the single definition of that rule. It is written with index tensors
and table lookups only, so the same function is evaluated over a full broadcast grid for the
boolean / dense forms and element-wise (vmapped, or inside a kernel) as the flex ``mask_mod``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from dspark_core.modeling.blocks import _check_anchors, _check_keep, _check_positive_int
from dspark_core.validation import is_int

__all__ = [
    "block_attention_allowed",
    "compiled_create_block_mask",
    "dense_block_mask",
    "flex_block_mask",
]


def _allowed_rule(
    batch_idx: Tensor,
    q_idx: Tensor,
    kv_idx: Tensor,
    *,
    anchors: Tensor,
    keep: Tensor,
    document_ids: Tensor | None,
    seq_len: int | Tensor,
    block_size: int,
) -> Tensor:
    """Whether query ``q_idx`` may attend to key ``kv_idx`` in row ``batch_idx``.

    The index arguments are long tensors that broadcast against each other (0-d inside a flex
    ``mask_mod``). ``anchors``/``keep`` are ``[b, N]``, ``document_ids`` ``[b, S]`` or None.
    """
    num_anchors = anchors.shape[1]
    # Clamped so that any out-of-range index a kernel might probe still reads valid memory.
    block = torch.clamp(q_idx // block_size, max=num_anchors - 1)
    anchor = anchors[batch_idx, block]
    in_context = kv_idx < seq_len
    sees_context = in_context & keep[batch_idx, block] & (kv_idx < anchor)
    if document_ids is not None:
        ctx_idx = torch.where(in_context, kv_idx, torch.zeros_like(kv_idx))
        sees_context = sees_context & (document_ids[batch_idx, ctx_idx] == document_ids[batch_idx, anchor])
    # For context keys (kv_idx < S) the floor division is negative, so it never matches a block.
    own_block = (kv_idx - seq_len) // block_size == block
    return sees_context | (~in_context & own_block)


def _check_mask_args(
    anchors: Tensor, keep: Tensor, seq_len: int, block_size: int, document_ids: Tensor | None
) -> tuple[int, int]:
    _check_anchors(anchors)
    _check_keep(keep, anchors)
    block_size = _check_positive_int(block_size, "block_size")
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
    if document_ids is not None:
        expected = (anchors.shape[0], seq_len)
        if tuple(document_ids.shape) != expected:
            raise ValueError(
                f"`document_ids` has shape {tuple(document_ids.shape)}, expected {expected} "
                "([batch of `anchors`, `seq_len`])."
            )
    return seq_len, block_size


def block_attention_allowed(
    anchors: Tensor,
    keep: Tensor,
    seq_len: int,
    block_size: int,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Boolean mask ``[b, N*B, S + N*B]``: True where block query may attend to key/value."""
    seq_len, block_size = _check_mask_args(anchors, keep, seq_len, block_size, document_ids)
    batch, num_anchors = anchors.shape
    device = anchors.device
    q_len = num_anchors * block_size
    return _allowed_rule(
        torch.arange(batch, device=device).view(-1, 1, 1),
        torch.arange(q_len, device=device).view(1, -1, 1),
        torch.arange(seq_len + q_len, device=device).view(1, 1, -1),
        anchors=anchors.long(),
        keep=keep.bool(),
        document_ids=document_ids,
        seq_len=seq_len,
        block_size=block_size,
    )


def dense_block_mask(
    anchors: Tensor,
    keep: Tensor,
    seq_len: int,
    block_size: int,
    document_ids: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive mask ``[b, 1, N*B, S + N*B]`` for SDPA / eager attention.

    0 where attention is allowed, ``torch.finfo(dtype).min`` elsewhere; broadcasts over heads.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
    allowed = block_attention_allowed(anchors, keep, seq_len, block_size, document_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@functools.cache
def compiled_create_block_mask() -> Callable[..., BlockMask]:
    """``torch.compile(create_block_mask)``, created once per process.

    Compiling avoids materialising the full ``[b, h, Q, KV]`` boolean mask while building the
    block mask; caching the compiled wrapper keeps dynamo's compiled graphs across calls instead
    of recompiling on every training step.
    """
    compiled: Callable[..., BlockMask] = torch.compile(create_block_mask)
    return compiled


def flex_block_mask(
    anchors: Tensor,
    keep: Tensor,
    seq_len: int,
    block_size: int,
    document_ids: Tensor | None = None,
    *,
    num_heads: int | None = None,
    compile: bool | None = None,
) -> BlockMask:
    """Flex-attention ``BlockMask`` for the rule of :func:`block_attention_allowed`.

    Built with the default 128 x 128 tile on ``anchors.device``. ``num_heads=None`` broadcasts the
    mask over heads.

    ``compile``: build with the cached :func:`compiled_create_block_mask` (True) or eagerly (False).
    ``None`` compiles on CUDA only: on CPU, inductor needs a C++ toolchain and spends seconds
    compiling for masks that are small there anyway, so eager building is the better default
    (the resulting ``BlockMask`` is the same).
    """
    seq_len, block_size = _check_mask_args(anchors, keep, seq_len, block_size, document_ids)
    if num_heads is not None:
        num_heads = _check_positive_int(num_heads, "num_heads")
    device = anchors.device
    if compile is None:
        compile = device.type == "cuda"
    batch, num_anchors = anchors.shape
    q_len = num_anchors * block_size

    anchors_t = anchors.long()
    keep_t = keep.bool()
    docs_t = None if document_ids is None else document_ids.to(device)
    # A 0-d tensor rather than a Python int, so the length is data, not a constant baked into the
    # traced mask_mod (on CPU, lengths 50, 53, 55 compiled twice, then reused the dynamic graph).
    seq_len_t = torch.tensor(seq_len, dtype=torch.long, device=device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _allowed_rule(
            b,
            q_idx,
            kv_idx,
            anchors=anchors_t,
            keep=keep_t,
            document_ids=docs_t,
            seq_len=seq_len_t,
            block_size=block_size,
        )

    builder: Callable[..., Any] = compiled_create_block_mask() if compile else create_block_mask
    block_mask: BlockMask = builder(mask_mod, batch, num_heads, q_len, seq_len + q_len, device=device)
    return block_mask
