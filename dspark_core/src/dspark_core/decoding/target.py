"""The target behind a :class:`~dspark_core.decoding.ragged_cache.RaggedKVCache`: feeds a batch of
token chunks, each row at its own length, and cuts each row back to what it committed.

transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; the name is read from the
signature once per forward function. HF's own ``DynamicCache`` is not used: its sliding-window layers
cannot be cut back, and it holds one length for the whole batch.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.decoding.ragged_cache import RaggedKVCache, layer_masks, target_layer_types
from dspark_core.modeling.features import LayerCapture


@functools.lru_cache(maxsize=64)
def forward_kwargs(forward: Callable[..., Any]) -> tuple[str, bool]:
    """The name of the cache kwarg (``cache`` from transformers 5.24, ``past_key_values`` before) and
    whether ``logits_to_keep`` is accepted, read once per forward function."""
    parameters = inspect.signature(forward).parameters
    if "cache" in parameters:
        name = "cache"
    elif "past_key_values" in parameters:
        name = "past_key_values"
    else:
        raise TypeError(
            f"{getattr(forward, '__qualname__', forward)} takes neither `cache` nor `past_key_values`: "
            "speculative decoding needs an HF causal LM with a KV cache"
        )
    return name, "logits_to_keep" in parameters


def synchronize(device: torch.device) -> None:
    # Wall times are only meaningful once queued kernels have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CachedTarget:
    """The target with a :class:`RaggedKVCache`: feeds a batch of token chunks, row ``i`` at its own
    committed length, and keeps what :meth:`commit` says."""

    def __init__(self, target: nn.Module, capture: LayerCapture | None, *, batch: int, capacity: int) -> None:
        self.target = target
        self.capture = capture
        self.device = next(target.parameters()).device
        self.dtype = next(target.parameters()).dtype
        self.layer_types, self.window = target_layer_types(target)
        self.cache = RaggedKVCache(
            len(self.layer_types), torch.zeros(batch, dtype=torch.long, device=self.device), capacity
        )
        self.cache_kwarg, self.has_logits_to_keep = forward_kwargs(type(target).forward)
        self.forwards = 0
        self.seconds = 0.0
        self.last_seconds = 0.0

    @property
    def lengths(self) -> Tensor:
        """``[b]``: each row's committed length."""
        return self.cache.lengths

    @property
    def length(self) -> int:
        """The longest row's committed length (the only row's, at batch size 1)."""
        return self.cache.get_seq_length()

    def feed(
        self, tokens: Tensor, *, keep: Tensor | None = None, cache: RaggedKVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run ``tokens [b, T]``, row ``i`` at positions ``lengths[i] .. lengths[i] + T - 1``.

        Returns float logits ``[b, T, V]`` (with ``keep [b]``, only ``[b, V]`` at position ``keep[i]``
        of each row's chunk) and, with a capture, the features ``[b, T, L*H]``. The cache's lengths
        do not move until :meth:`commit`. ``cache`` feeds another cache than the batch's (rows
        about to join it).
        """
        cache = self.cache if cache is None else cache
        batch, count = tokens.shape
        starts = cache.lengths
        positions = starts.view(-1, 1) + torch.arange(count, device=self.device)
        cache.begin(count)
        width = int(starts.max()) + count
        kwargs: dict[str, Any] = {
            self.cache_kwarg: cache,
            "use_cache": True,
            "position_ids": positions,
            "attention_mask": layer_masks(starts, count, width, self.layer_types, self.window, self.dtype),
        }
        picked: Tensor | None = None
        if keep is not None and self.has_logits_to_keep:
            # Only the positions some row needs go through lm_head.
            picked, keep = torch.unique(keep, return_inverse=True)
            kwargs["logits_to_keep"] = int(count - picked[0]) if picked.numel() == 1 else picked
        if self.capture is not None:
            self.capture.clear()
        synchronize(self.device)
        began = time.perf_counter()
        with torch.no_grad():
            outputs = self.target(input_ids=tokens.to(self.device), **kwargs)
        logits: Tensor = outputs.logits.float()
        if keep is not None:
            rows = torch.arange(batch, device=logits.device)
            if picked is not None and picked.numel() == 1:
                logits = logits[:, 0]
            else:
                logits = logits[rows, keep.to(logits.device)]
        features = self.capture.features() if self.capture is not None else None
        synchronize(self.device)
        self.last_seconds = time.perf_counter() - began
        self.seconds += self.last_seconds
        self.forwards += 1
        return logits, features

    def join(self, prompts: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """New rows join the batch: ``prompts [m, P]`` (row ``i``'s first ``lengths[i]`` tokens count)
        are prefilled in their own forward and appended after the running rows. Returns the logits
        ``[m, V]`` at each prompt's last token and the prompts' features."""
        joining = RaggedKVCache(
            len(self.layer_types), torch.zeros_like(lengths, device=self.device), self.cache.capacity
        )
        logits, features = self.feed(prompts, keep=lengths - 1, cache=joining)
        joining.commit(lengths)
        self.cache.append(joining)
        return logits, features

    def commit(self, lengths: Tensor) -> None:
        """Row ``i`` keeps its first ``lengths[i]`` positions (the cut-back after a rejection)."""
        self.cache.commit(lengths)

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows``: finished rows stop costing target compute."""
        self.cache.select(rows)
