"""Batching examples or packed rows into right-padded ``torch.long`` tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark_core.training.data.rows import PAD_DOCUMENT_ID, Example, PackedRow

__all__ = ["Collator", "collate"]


@dataclass(frozen=True)
class Collator:
    """Right-pad a batch of :class:`Example` or of :class:`PackedRow` into ``torch.long`` tensors.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``loss_mask`` (padded with 0) and
    ``attention_mask`` (1 on real tokens), all ``[b, S]`` with S the batch's longest row rounded up to
    ``pad_to_multiple_of``. For packed rows it also returns ``document_ids`` (padding gets
    :data:`PAD_DOCUMENT_ID`) and ``position_ids`` (restarting at each document, 0 on padding).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[Example] | Sequence[PackedRow]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        packed = isinstance(batch[0], PackedRow)
        if any(isinstance(item, PackedRow) != packed for item in batch):
            raise TypeError("a batch must be all Example or all PackedRow, not a mix")
        seq_len = max(len(item) for item in batch)
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(batch), seq_len)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        document_ids = torch.full(shape, PAD_DOCUMENT_ID, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        items: Sequence[Example | PackedRow] = batch
        for b, item in enumerate(items):
            n = len(item)
            input_ids[b, :n] = torch.tensor(item.input_ids, dtype=torch.long)
            loss_mask[b, :n] = torch.tensor(item.loss_mask, dtype=torch.long)
            attention_mask[b, :n] = 1
            if isinstance(item, PackedRow):
                document_ids[b, :n] = torch.tensor(item.document_ids, dtype=torch.long)
                position_ids[b, :n] = torch.tensor(item.position_ids, dtype=torch.long)
        out = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
        if packed:
            out["document_ids"] = document_ids
            out["position_ids"] = position_ids
        return out


def collate(
    batch: Sequence[Example] | Sequence[PackedRow],
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Functional form of :class:`Collator`."""
    return Collator(pad_token_id, pad_to_multiple_of)(batch)
