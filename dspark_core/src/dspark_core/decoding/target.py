"""The target behind an HF ``DynamicCache``: feeds token chunks at the cache's end and crops it.

transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; the name is read from the
signature once per forward function. ``DynamicCache.crop`` is given a negative count, which works on
every supported version.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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
    """The target with an HF ``DynamicCache``: feeds token chunks at the cache's end and crops it."""

    def __init__(self, target: nn.Module, capture: LayerCapture | None) -> None:
        from transformers import DynamicCache

        self.target = target
        self.capture = capture
        self.device = next(target.parameters()).device
        self.cache = DynamicCache(config=getattr(target, "config", None))
        self.cache_kwarg, self.has_logits_to_keep = forward_kwargs(type(target).forward)
        self.forwards = 0
        self.seconds = 0.0

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def feed(self, tokens: Tensor, *, last_logits_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """Run ``tokens`` ``[1, T]`` at positions ``length .. length + T - 1``.

        Returns float logits ``[T, V]`` (``[1, V]`` with ``last_logits_only``) and, with a capture,
        the features ``[1, T, L*H]``.
        """
        start = self.length
        positions = torch.arange(start, start + tokens.shape[1], device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache, "use_cache": True, "position_ids": positions}
        if last_logits_only and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.capture is not None:
            self.capture.clear()
        synchronize(self.device)
        began = time.perf_counter()
        with torch.no_grad():
            outputs = self.target(input_ids=tokens.to(self.device), **kwargs)
        logits: Tensor = outputs.logits[0]
        if last_logits_only:
            logits = logits[-1:]
        features = self.capture.features() if self.capture is not None else None
        synchronize(self.device)
        self.seconds += time.perf_counter() - began
        self.forwards += 1
        return logits, features

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        excess = self.length - length
        if excess < 0:
            raise RuntimeError(f"cannot crop a target cache of length {self.length} to {length}")
        if excess:
            # A negative argument removes that many tokens on every supported transformers version.
            self.cache.crop(-excess)
