"""Anchors and the per-block tensors of DSpark training (method reference, section 4).

A row of ``S`` tokens yields ``N`` blocks of ``B`` slots each. Block ``n`` starts at its anchor
``a_n``; slot ``k`` sits at position ``a_n + k`` and predicts ``input_ids[a_n + k + 1]``. Every block
tensor here has shape ``[b, N, B]``.

Packing: several documents may share a row. ``document_ids`` ``[b, S]`` then labels each token with
its document; a document must be one contiguous run of equal ids and neighbouring documents must
have different ids (an increasing counter per row does this). Anchors, positions, eval masks and the
attention mask all respect those boundaries.

Index values (anchors in ``[0, S-1]``) are not checked, since that would force a device sync on
every step; ``sample_anchors`` only produces valid ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dspark_core.errors import DraftConfigError
from dspark_core.validation import is_int

__all__ = [
    "anchor_candidates",
    "block_eval_mask",
    "block_input_ids",
    "block_labels",
    "block_position_ids",
    "block_previous_tokens",
    "block_target_positions",
    "context_position_ids",
    "gather_blocks",
    "sample_anchors",
]


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------


def _check_positive_int(value: object, name: str) -> int:
    # True as a block size is certainly a bug.
    if not is_int(value):
        raise DraftConfigError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    if value < 1:
        raise DraftConfigError(f"`{name}` must be >= 1, got {value}.")
    return value


def _check_2d(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must have shape [batch, seq_len], got {tuple(x.shape)}.")


def _check_same_shape(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)} but `{ref_name}` has shape {tuple(ref.shape)}; "
            "they must match."
        )


def _check_anchors(anchors: Tensor, batch: int | None = None) -> None:
    if not isinstance(anchors, Tensor):
        raise TypeError(f"`anchors` must be a torch.Tensor, got {type(anchors).__name__}.")
    if anchors.dim() != 2:
        raise ValueError(f"`anchors` must have shape [batch, num_anchors], got {tuple(anchors.shape)}.")
    if anchors.dtype.is_floating_point or anchors.dtype == torch.bool:
        raise ValueError(f"`anchors` must be an integer tensor, got dtype {anchors.dtype}.")
    if batch is not None and anchors.shape[0] != batch:
        raise ValueError(
            f"`anchors` has batch size {anchors.shape[0]} but the sequence tensors have batch size {batch}."
        )


def _check_keep(keep: Tensor, anchors: Tensor) -> None:
    if not isinstance(keep, Tensor):
        raise TypeError(f"`keep` must be a torch.Tensor, got {type(keep).__name__}.")
    _check_same_shape(keep, "keep", anchors, "anchors")


def _check_document_ids(document_ids: Tensor | None, ref: Tensor, ref_name: str) -> None:
    if document_ids is None:
        return
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"`document_ids` must be a torch.Tensor, got {type(document_ids).__name__}.")
    _check_same_shape(document_ids, "document_ids", ref, ref_name)


def _slot_offsets(block_size: int, device: torch.device) -> Tensor:
    return torch.arange(block_size, device=device, dtype=torch.long)


def _slot_indices(anchors: Tensor, block_size: int, shift: int, seq_len: int) -> Tensor:
    """``a_n + k + shift`` for every slot, clamped to ``[0, seq_len - 1]``; ``[b, N, B]`` long."""
    idx = anchors.long().unsqueeze(-1) + _slot_offsets(block_size, anchors.device) + shift
    return idx.clamp(min=0, max=max(seq_len - 1, 0))


# ---------------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------------


def anchor_candidates(loss_mask: Tensor, *, document_ids: Tensor | None = None) -> Tensor:
    """Boolean ``[b, S]``: True at each position ``a`` that may start a block.

    ``a`` qualifies iff ``a <= S-2``, ``loss_mask[a]`` and ``loss_mask[a+1]`` are set and, when
    packed, ``a`` and ``a+1`` lie in the same document.
    """
    _check_2d(loss_mask, "loss_mask")
    _check_document_ids(document_ids, loss_mask, "loss_mask")
    on = loss_mask != 0
    cand = torch.zeros_like(on)
    pair = on[:, :-1] & on[:, 1:]
    if document_ids is not None:
        pair = pair & (document_ids[:, :-1] == document_ids[:, 1:])
    cand[:, :-1] = pair
    return cand


def sample_anchors(
    loss_mask: Tensor,
    num_anchors: int,
    *,
    document_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample up to ``num_anchors`` block starts per row, uniformly without replacement.

    Args:
        loss_mask: ``[b, S]``, non-zero on supervised (target-generated) tokens.
        num_anchors: N, blocks per row.
        document_ids: optional ``[b, S]`` document labels of a packed row.
        generator: source of randomness; its device is used to draw the keys, so a CPU generator
            gives the same anchors whichever device ``loss_mask`` is on.

    Returns:
        ``(anchors, keep)``, both ``[b, N]``: ``anchors`` long, sorted ascending over the kept
        entries; ``keep`` bool. Rows with fewer than N candidates are padded at the end with
        ``keep=False`` and anchor 0.
    """
    _check_2d(loss_mask, "loss_mask")
    num_anchors = _check_positive_int(num_anchors, "num_anchors")
    cand = anchor_candidates(loss_mask, document_ids=document_ids)
    batch, seq_len = cand.shape
    device = loss_mask.device

    # Random keys + top-k is a uniform sample without replacement over the candidates.
    key_device = generator.device if generator is not None else device
    keys = torch.rand((batch, seq_len), generator=generator, device=key_device).to(device)
    keys = keys.masked_fill(~cand, -1.0)
    k = min(num_anchors, seq_len)
    picked_keys, picked = keys.topk(k, dim=1)
    kept = picked_keys >= 0.0

    # Sort kept anchors ascending and push padding to the end by giving it an out-of-range key.
    order_key = torch.where(kept, picked, torch.full_like(picked, seq_len))
    order_key, order = order_key.sort(dim=1)
    kept = kept.gather(1, order)
    anchors = torch.where(kept, order_key, torch.zeros_like(order_key))

    if k < num_anchors:
        pad = num_anchors - k
        anchors = torch.cat([anchors, anchors.new_zeros(batch, pad)], dim=1)
        kept = torch.cat([kept, kept.new_zeros(batch, pad)], dim=1)
    return anchors.long(), kept


# ---------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------


def context_position_ids(
    seq_len: int | None = None,
    *,
    document_ids: Tensor | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Context position ids ``[b, S]`` (long).

    Without ``document_ids``: ``0..S-1`` for each of ``batch_size`` rows (an expanded view).
    With ``document_ids`` ``[b, S]``: the position restarts at 0 at every document start, and
    ``seq_len`` / ``batch_size`` / ``device`` are taken from it (``seq_len`` must agree if given).
    """
    if document_ids is None:
        if seq_len is None:
            raise ValueError("context_position_ids needs `seq_len` or `document_ids`.")
        if not is_int(seq_len) or seq_len < 0:
            raise ValueError(f"`seq_len` must be a non-negative int, got {seq_len!r}.")
        _check_positive_int(batch_size, "batch_size")
        pos = torch.arange(seq_len, device=device, dtype=torch.long)
        return pos.unsqueeze(0).expand(batch_size, seq_len)

    _check_2d(document_ids, "document_ids")
    batch, length = document_ids.shape
    if seq_len is not None and seq_len != length:
        raise ValueError(
            f"`seq_len`={seq_len} disagrees with `document_ids` of shape {tuple(document_ids.shape)}."
        )
    idx = torch.arange(length, device=document_ids.device, dtype=torch.long).expand(batch, length)
    starts = torch.ones(batch, length, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # Index of the most recent document start, by a running max over start indices.
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def block_position_ids(anchors: Tensor, block_size: int, context_positions: Tensor | None = None) -> Tensor:
    """Position ids of the block slots, ``[b, N, B]``: slot k of block n has
    ``context_positions[a_n] + k``.

    ``context_positions`` is ``[b, S]`` or ``[1, S]`` (from :func:`context_position_ids`); ``None``
    means plain ``0..S-1``, so slot k sits at ``a_n + k``.
    """
    _check_anchors(anchors)
    block_size = _check_positive_int(block_size, "block_size")
    offsets = _slot_offsets(block_size, anchors.device)
    if context_positions is None:
        return anchors.long().unsqueeze(-1) + offsets
    _check_2d(context_positions, "context_positions")
    batch = anchors.shape[0]
    if context_positions.shape[0] not in (1, batch):
        raise ValueError(
            f"`context_positions` has batch size {context_positions.shape[0]}, expected 1 or {batch} "
            "(the batch size of `anchors`)."
        )
    ctx = context_positions.expand(batch, context_positions.shape[1])
    start = ctx.long().gather(1, anchors.long())
    return start.unsqueeze(-1) + offsets


# ---------------------------------------------------------------------------------------------------
# Per-slot token tensors
# ---------------------------------------------------------------------------------------------------


def block_input_ids(
    input_ids: Tensor, anchors: Tensor, keep: Tensor, block_size: int, mask_token_id: int
) -> Tensor:
    """Draft input ids ``[b, N, B]``: ``input_ids[a_n]`` in slot 0, ``mask_token_id`` elsewhere.

    A block that is not kept is all ``mask_token_id``.
    """
    _check_2d(input_ids, "input_ids")
    _check_anchors(anchors, input_ids.shape[0])
    _check_keep(keep, anchors)
    block_size = _check_positive_int(block_size, "block_size")
    if not is_int(mask_token_id) or mask_token_id < 0:
        raise DraftConfigError(f"`mask_token_id` must be a non-negative int, got {mask_token_id!r}.")
    batch, num_anchors = anchors.shape
    out = input_ids.new_full((batch, num_anchors, block_size), mask_token_id)
    first = input_ids.gather(1, anchors.long())
    out[:, :, 0] = torch.where(keep.bool(), first, torch.full_like(first, mask_token_id))
    return out


def block_labels(input_ids: Tensor, anchors: Tensor, block_size: int) -> Tensor:
    """Labels ``[b, N, B]``: slot k's target is ``input_ids[a_n + k + 1]``.

    The index is clamped to ``S-1``; :func:`block_eval_mask` is False on those slots.
    """
    _check_2d(input_ids, "input_ids")
    _check_anchors(anchors, input_ids.shape[0])
    block_size = _check_positive_int(block_size, "block_size")
    return gather_blocks(input_ids, _slot_indices(anchors, block_size, 1, input_ids.shape[1]))


def block_previous_tokens(input_ids: Tensor, anchors: Tensor, block_size: int) -> Tensor:
    """Teacher-forced previous tokens ``[b, N, B]`` for the Markov head: ``input_ids[a_n + k]``
    (the anchor token for k = 0), index clamped to ``S-1``."""
    _check_2d(input_ids, "input_ids")
    _check_anchors(anchors, input_ids.shape[0])
    block_size = _check_positive_int(block_size, "block_size")
    return gather_blocks(input_ids, _slot_indices(anchors, block_size, 0, input_ids.shape[1]))


def block_target_positions(anchors: Tensor, block_size: int, seq_len: int) -> Tensor:
    """Sequence index ``a_n + k`` (clamped to ``S-1``) of each slot, ``[b, N, B]`` long.

    The teacher's final hidden state at this index gives slot k's teacher logits; use with
    :func:`gather_blocks`.
    """
    _check_anchors(anchors)
    block_size = _check_positive_int(block_size, "block_size")
    seq_len = _check_positive_int(seq_len, "seq_len")
    return _slot_indices(anchors, block_size, 0, seq_len)


def block_eval_mask(
    loss_mask: Tensor,
    anchors: Tensor,
    keep: Tensor,
    block_size: int,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Which slots are supervised, ``[b, N, B]`` bool: a contiguous prefix of each block.

    Slot k is valid iff, for every j <= k: ``a_n + j + 1 < S``, ``loss_mask[a_n + j + 1]`` is set,
    the block is kept and (when packed) ``a_n + j + 1`` is in the anchor's document.
    """
    _check_2d(loss_mask, "loss_mask")
    _check_anchors(anchors, loss_mask.shape[0])
    _check_keep(keep, anchors)
    _check_document_ids(document_ids, loss_mask, "loss_mask")
    block_size = _check_positive_int(block_size, "block_size")
    seq_len = loss_mask.shape[1]

    raw = anchors.long().unsqueeze(-1) + _slot_offsets(block_size, anchors.device) + 1
    target = raw.clamp(max=max(seq_len - 1, 0))
    valid = (raw < seq_len) & gather_blocks(loss_mask != 0, target) & keep.bool().unsqueeze(-1)
    if document_ids is not None:
        anchor_doc = document_ids.gather(1, anchors.long()).unsqueeze(-1)
        valid = valid & (gather_blocks(document_ids, target) == anchor_doc)
    # Running product over k: supervision stops at the first invalid slot.
    return valid.to(torch.int32).cumprod(dim=-1).bool()


def gather_blocks(x: Tensor, index: Tensor) -> Tensor:
    """Gather rows of ``x`` ``[b, S, ...]`` at ``index`` ``[b, N, B]``: returns ``[b, N, B, ...]``.

    Advanced indexing avoids materialising an index expanded over the trailing (e.g. hidden)
    dimensions; it is differentiable with respect to ``x``.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("`x` must be a tensor of shape [batch, seq_len, ...].")
    if not isinstance(index, Tensor) or index.dim() != 3:
        raise ValueError(
            "`index` must have shape [batch, num_anchors, block_size], got "
            f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}."
        )
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"`index` has batch size {index.shape[0]} but `x` has batch size {x.shape[0]}.")
    rows = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    return x[rows, index.long().to(x.device)]
