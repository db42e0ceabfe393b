"""The order examples are read in: set by ``(seed, epoch)`` only, so a resumed run continues exactly."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from dspark_core.training.data.collate import Collator
from dspark_core.training.data.dataset import TokenizedDataset
from dspark_core.training.data.rows import DatasetError, Example, PackedRow
from dspark_core.validation import is_int

__all__ = ["DataPosition", "ResumableSampler", "epoch_order", "iter_batches"]


@dataclass(frozen=True, order=True)
class DataPosition:
    """How far training has read: ``index`` examples of epoch ``epoch``'s order already consumed.

    With several ranks, ``index`` counts examples consumed by all ranks together.
    """

    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        for name in ("epoch", "index"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise DatasetError(f"DataPosition.{name} must be a non-negative integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """A JSON-serialisable form, for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> DataPosition:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(epoch=state["epoch"], index=state["index"])
        except KeyError as exc:
            raise DatasetError(f"a data position needs 'epoch' and 'index', got {sorted(state)}") from exc

    def advanced(self, consumed: int) -> DataPosition:
        """The position after ``consumed`` more examples of the same epoch."""
        return DataPosition(self.epoch, self.index + consumed)

    def next_epoch(self) -> DataPosition:
        """The start of the following epoch."""
        return DataPosition(self.epoch + 1, 0)


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of example indices for ``epoch``: a permutation depending only on ``(seed, epoch)``.

    Uses Python's ``random`` with a string seed, whose algorithm is stable across Python and torch
    versions, so an order can be reproduced when resuming on another machine.
    """
    order = list(range(num_examples))
    if shuffle:
        random.Random(f"dspark-data/{seed}/{epoch}").shuffle(order)
    return order


class ResumableSampler(Sampler[int]):
    """Yields this rank's example indices for one epoch, from a :class:`DataPosition` on.

    The global order of an epoch is :func:`epoch_order`. From ``position.index`` on it is cut to a
    multiple of ``num_replicas`` (so every rank gets as many examples) and dealt round-robin: rank r
    gets ``order[index + r], order[index + r + num_replicas], ...``. Iterating does not move the
    position: after consuming ``k`` examples on each rank, call :meth:`position_after` for the
    checkpoint, and :meth:`set_position` (or :meth:`set_epoch`) before the next pass.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        start: DataPosition | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_examples < 0:
            raise ValueError(f"num_examples must be non-negative, got {num_examples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.position = DataPosition()
        self.set_position(start or DataPosition())

    def set_position(self, position: DataPosition) -> None:
        """Continue from ``position`` on the next iteration."""
        if position.index > self.num_examples:
            raise DatasetError(
                f"data position index {position.index} is past the end of an epoch of {self.num_examples} "
                "examples; was the checkpoint made with a different dataset?"
            )
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning on the next iteration."""
        self.set_position(DataPosition(epoch, 0))

    def _usable(self) -> int:
        remaining = self.num_examples - self.position.index
        return remaining - remaining % self.num_replicas

    def __len__(self) -> int:
        return self._usable() // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(
            self.num_examples, seed=self.seed, epoch=self.position.epoch, shuffle=self.shuffle
        )
        start = self.position.index
        yield from order[start + self.rank : start + self._usable() : self.num_replicas]

    def position_after(self, consumed_per_rank: int) -> DataPosition:
        """The global position once every rank has consumed ``consumed_per_rank`` examples of this pass."""
        return self.position.advanced(consumed_per_rank * self.num_replicas)


def iter_batches(
    dataset: Sequence[Example] | Sequence[PackedRow] | TokenizedDataset,
    *,
    batch_size: int,
    seed: int = 0,
    start: DataPosition | None = None,
    collate_fn: Collator | None = None,
    shuffle: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    num_epochs: int | None = None,
) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
    """Yield ``(position_after, batch)`` from ``start`` on, epoch after epoch, without a DataLoader.

    Each epoch drops its last incomplete batch. ``position_after`` is where to resume once the batch
    has been trained on, so saving it with a checkpoint and passing it back as ``start`` continues with
    exactly the next batch. ``num_epochs`` (counted from epoch 0) stops the iteration; ``None`` runs
    forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    collator = collate_fn or Collator()
    sampler = ResumableSampler(
        len(dataset), seed=seed, shuffle=shuffle, start=start, num_replicas=num_replicas, rank=rank
    )
    if len(dataset) < batch_size * num_replicas:
        raise DatasetError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch "
            f"({batch_size} x {num_replicas} ranks)"
        )
    while num_epochs is None or sampler.position.epoch < num_epochs:
        indices = list(sampler)
        for b in range(len(indices) // batch_size):
            chunk = indices[b * batch_size : (b + 1) * batch_size]
            items: list[Any] = [dataset[i] for i in chunk]
            yield sampler.position_after((b + 1) * batch_size), collator(items)
        sampler.set_position(sampler.position.next_epoch())
