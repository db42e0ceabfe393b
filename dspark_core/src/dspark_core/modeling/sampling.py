"""Temperature, top-k and top-p filtering shared by the draft and the verifier.

Speculative sampling is lossless only if the draft's ``q`` and the target's ``p`` are filtered by the
same rule, so both sides call :func:`filtered_probs`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dspark_core.validation import is_int, is_real

__all__ = ["check_sampling_options", "filtered_probs"]


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` naming the option unless ``temperature >= 0``, ``top_k >= 1`` (an int) and
    ``top_p`` in ``(0, 1]``; ``None`` disables a filter."""
    if not is_real(temperature) or math.isnan(temperature):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def filtered_probs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Return the float32 distribution over the last dim of ``logits`` after filtering.

    Args:
        logits: ``[..., V]`` unnormalised scores, any floating dtype.
        temperature: ``0`` means greedy: a one-hot at the argmax (the first on ties), ignoring
            ``top_k`` and ``top_p``. Otherwise the logits are divided by it before the filters.
        top_k: keep exactly the ``top_k`` highest-scoring tokens (``None`` keeps all).
        top_p: after top-k, keep the smallest set of most probable tokens whose total probability
            reaches ``top_p`` (``None`` or ``1.0`` keeps all). The most probable token is always kept.

    Returns:
        ``[..., V]`` float32 probabilities; each row sums to 1 and is zero outside the kept set.

    Raises:
        ValueError: on a negative temperature, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.
    """
    check_sampling_options(temperature, top_k, top_p)
    scores = logits.float()
    vocab = scores.shape[-1]
    if temperature == 0:
        index = scores.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter_(-1, index, 1.0)

    scores = scores / temperature
    if top_k is not None and top_k < vocab:
        # Keep exactly k entries (topk breaks ties by index), rather than everything >= the k-th value.
        kept = scores.topk(top_k, dim=-1).indices
        keep_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True)
        scores = scores.masked_fill(~keep_mask, float("-inf"))

    probs = torch.softmax(scores, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token is in the nucleus iff the mass strictly before it is still short of top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_keep = mass_before < top_p
        keep_mask = torch.zeros_like(sorted_keep).scatter_(-1, order, sorted_keep)
        probs = probs.masked_fill(~keep_mask, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
