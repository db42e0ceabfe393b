"""Packing several examples into one row (greedy first-fit), so little of a batch is padding."""

from __future__ import annotations

from collections.abc import Sequence

from dspark_core.training.data.dataset import TokenizedDataset
from dspark_core.training.data.rows import DatasetError, Example, PackedRow

__all__ = ["pack_examples"]


def pack_examples(examples: Sequence[Example] | TokenizedDataset, max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens, greedy first-fit in order.

    Each example goes into the first (lowest-numbered) row with room for it, opening a new row when
    none has; documents keep their order inside a row. Rows are not padded here (see :class:`Collator`).
    """
    if max_length < 1:
        raise DatasetError(f"max_length must be positive, got {max_length}")
    for i, example in enumerate(examples):
        if len(example) > max_length:
            where = str(example.origin) if example.origin is not None else f"example {i}"
            raise DatasetError(
                f"{where}: example of {len(example)} tokens does not fit max_length {max_length}; "
                "build the dataset with max_length to truncate it"
            )
    # Leftmost row with enough room, in O(log n): a max-tree over every row's remaining room. Rows not
    # yet opened have full room, so the leftmost fitting row is an open one or the next new one.
    size = 1
    while size < max(len(examples), 1):
        size *= 2
    room = [0] * (2 * size)
    for leaf in range(size, size + len(examples)):
        room[leaf] = max_length
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])

    members: list[list[int]] = []
    for i, example in enumerate(examples):
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= len(example) else 2 * node + 1
        row = node - size
        if row == len(members):
            members.append([])
        members[row].append(i)
        room[node] -= len(example)
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2

    packed: list[PackedRow] = []
    for docs in members:
        input_ids: list[int] = []
        loss_mask: list[int] = []
        document_ids: list[int] = []
        for doc, i in enumerate(docs):
            input_ids.extend(examples[i].input_ids)
            loss_mask.extend(examples[i].loss_mask)
            document_ids.extend([doc] * len(examples[i]))
        packed.append(PackedRow(input_ids, loss_mask, document_ids, tuple(examples[i].origin for i in docs)))
    return packed
