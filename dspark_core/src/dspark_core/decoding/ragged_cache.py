"""A target KV cache with one length per batch row, and the attention masks that go with it.

Batched speculative decoding commits a different number of tokens per row each round, and a
sliding-window target must be cut back after a rejection although HF's sliding-window cache cannot
``crop``. Both are solved the same way: :class:`RaggedKVCache` keeps every past key and value of
every layer (a sliding layer too), row ``i`` writes its next tokens right after its own
``lengths[i]`` committed positions, and cutting back is setting ``lengths``. Nothing past a row's
length is ever visible, because the masks from :func:`layer_masks` let a query at position ``q``
see only keys at positions ``<= q`` (and ``> q - window`` on a sliding layer), and stored slots are
positions. The masks are passed to the model as prepared 4D masks (one per layer type), which HF
models use as given with the ``sdpa`` and ``eager`` attention implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.fit import target_text_config

FULL = "full_attention"
SLIDING = "sliding_attention"
#: Attention implementations that apply a prepared 4D mask as given.
MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


def target_layer_types(target: nn.Module) -> tuple[list[str], int | None]:
    """The target's attention type per layer and its sliding window (``None`` without sliding layers).

    Raises:
        DraftConfigError: a layer type other than full or sliding attention (say, linear attention or
            chunked attention), or an attention implementation that ignores prepared masks.
    """
    config = target_text_config(target)
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise DraftConfigError(
            f"{type(target).__name__} uses attn_implementation={implementation!r}, which dspark decoding "
            f"cannot give its ragged masks to; load the target with attn_implementation='sdpa' (or 'eager')"
        )
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    window = getattr(config, "sliding_window", None)
    declared: Sequence[str] | None = getattr(config, "layer_types", None)
    if declared is None:
        # Models without layer_types (Mistral) apply config.sliding_window to every layer when set.
        declared = [SLIDING if window else FULL] * num_layers
    types = list(declared)
    for index, kind in enumerate(types):
        if kind not in (FULL, SLIDING):
            raise DraftConfigError(
                f"{type(target).__name__} layer {index} has layer type {kind!r}; dspark decoding supports "
                f"{FULL!r} and {SLIDING!r} layers only"
            )
    if SLIDING in types and not window:
        raise DraftConfigError(
            f"{type(target).__name__} has {SLIDING!r} layers but no config.sliding_window to size them"
        )
    return types, (int(window) if window and SLIDING in types else None)


class RaggedKVCache:
    """Keys and values ``[b, kv_heads, capacity, head_dim]`` per layer, row ``i`` valid up to ``lengths[i]``.

    It quacks like an HF ``Cache`` as far as a decoder forward needs (``update``,
    ``get_seq_length``): :meth:`begin` sets where each row's tokens go, the forward's ``update``
    calls write them there, and :meth:`commit` then says how many of them each row keeps.
    """

    is_compileable = False

    def __init__(self, num_layers: int, lengths: Tensor, capacity: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = lengths.clone()
        self.capacity = capacity
        self._index: Tensor | None = None
        self._width = 0

    def __len__(self) -> int:
        return len(self.keys)

    def begin(self, tokens: int) -> None:
        """The next forward feeds ``tokens`` per row, at positions ``lengths[i] ..``."""
        needed = int(self.lengths.max()) + tokens
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity))
        self._index = self.lengths.view(-1, 1) + torch.arange(tokens, device=self.lengths.device)
        self._width = needed

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write this forward's keys and values at each row's positions; return every stored slot
        up to the longest row's end (slots past a row's own end are masked)."""
        if self._index is None:
            raise RuntimeError("RaggedKVCache.update outside a forward started by begin()")
        batch, heads, tokens, dim = key_states.shape
        if self.keys[layer_idx] is None:
            shape = (batch, heads, self.capacity, dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        assert keys is not None and values is not None
        index = self._index.view(batch, 1, tokens, 1).expand(batch, heads, tokens, dim)
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        return keys[:, :, : self._width], values[:, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest row's committed length."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def commit(self, lengths: Tensor) -> None:
        """Each row keeps its first ``lengths[i]`` positions: the committed context."""
        self.lengths = lengths.to(self.lengths.device, torch.long).clone()
        self._index = None

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows``."""
        rows = rows.to(self.lengths.device)
        self.lengths = self.lengths.index_select(0, rows)
        for i, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            if keys is not None and values is not None:
                self.keys[i] = keys.index_select(0, rows)
                self.values[i] = values.index_select(0, rows)

    def append(self, other: RaggedKVCache) -> None:
        """Add ``other``'s rows after this cache's (rows joining a running batch); same capacity."""
        if other.capacity != self.capacity:
            raise ValueError(f"cannot append a cache of capacity {other.capacity} to one of {self.capacity}")
        self.lengths = torch.cat([self.lengths, other.lengths.to(self.lengths.device)])
        for i, (keys, values) in enumerate(zip(other.keys, other.values, strict=True)):
            mine_keys, mine_values = self.keys[i], self.values[i]
            if keys is None or values is None:
                continue
            if mine_keys is None or mine_values is None:
                self.keys[i], self.values[i] = keys, values
            else:
                self.keys[i] = torch.cat([mine_keys, keys.to(mine_keys.device)])
                self.values[i] = torch.cat([mine_values, values.to(mine_values.device)])

    def _grow(self, capacity: int) -> None:
        for i, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            if keys is not None and values is not None:
                pad = capacity - keys.shape[2]
                self.keys[i] = torch.nn.functional.pad(keys, (0, 0, 0, pad))
                self.values[i] = torch.nn.functional.pad(values, (0, 0, 0, pad))
        self.capacity = capacity


def layer_masks(
    starts: Tensor,
    tokens: int,
    width: int,
    layer_types: Sequence[str],
    window: int | None,
    dtype: torch.dtype,
) -> Tensor | dict[str, Tensor]:
    """Additive masks ``[b, 1, tokens, width]``: row ``i``'s query ``j`` sits at position
    ``starts[i] + j`` and sees keys at positions ``<= `` it, and on sliding layers only the last
    ``window`` of those (HF's rule: ``kv > q - window``).

    One tensor when every layer has the same type (models that take a single mask accept it), a
    dict by layer type otherwise (the form hybrid HF models accept).
    """
    device = starts.device
    queries = starts.view(-1, 1, 1) + torch.arange(tokens, device=device).view(1, -1, 1)
    keys = torch.arange(width, device=device).view(1, 1, -1)
    causal = keys <= queries
    minimum = torch.finfo(dtype).min

    def additive(visible: Tensor) -> Tensor:
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, minimum)
        return mask.unsqueeze(1)

    masks: dict[str, Tensor] = {}
    for kind in dict.fromkeys(layer_types):
        if kind == SLIDING:
            assert window is not None
            masks[kind] = additive(causal & (keys > queries - window))
        else:
            masks[kind] = additive(causal)
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks
