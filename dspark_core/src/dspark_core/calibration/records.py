"""What calibration learns from: per verify round, the raw confidence logits and the accepted count.

Rounds are recorded with the schedule off, so every drafted slot is verified and has a label:
slot k of a round is "accepted" iff ``accepted > k`` (the target accepts a prefix). A round that
drafted fewer slots (the token budget's last rounds) labels only those it drafted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dspark_core.decoding.metrics import RoundRecord


@dataclass(frozen=True)
class RoundSample:
    """One verify round: the raw logits of the verified slots and how many of them were accepted."""

    logits: tuple[float, ...]
    accepted: int

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= len(self.logits):
            raise ValueError(f"accepted {self.accepted} must lie in [0, {len(self.logits)}]")


@dataclass
class CalibrationRecords:
    """The samples of a calibration run, for a draft of ``block_size`` positions."""

    block_size: int
    samples: list[RoundSample] = field(default_factory=list)

    def add_round(self, record: RoundRecord) -> None:
        """Keep a decoded round's verified slots; a round without confidences (no head, or no draft call)
        adds nothing."""
        verified = min(record.proposed, len(record.confidence_logits))
        if verified == 0:
            return
        if record.proposed != len(record.confidence_logits):
            raise ValueError(
                "calibration needs every drafted slot verified: decode with schedule 'off' "
                f"(round {record.index} drafted {len(record.confidence_logits)}, verified {record.proposed})"
            )
        self.samples.append(RoundSample(record.confidence_logits[:verified], record.accepted))

    def extend(self, samples: Iterable[RoundSample]) -> None:
        for sample in samples:
            if len(sample.logits) > self.block_size:
                raise ValueError(
                    f"a round of {len(sample.logits)} slots exceeds block_size {self.block_size}"
                )
            self.samples.append(sample)

    def as_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``logits [N, B]`` (0 past a round's verified slots), ``accepted [N]``, ``verified [N]``."""
        logits = torch.zeros(len(self.samples), self.block_size, dtype=torch.float64)
        for row, sample in enumerate(self.samples):
            if sample.logits:
                logits[row, : len(sample.logits)] = torch.tensor(sample.logits, dtype=torch.float64)
        accepted = torch.tensor([s.accepted for s in self.samples], dtype=torch.long)
        verified = torch.tensor([len(s.logits) for s in self.samples], dtype=torch.long)
        return logits, accepted, verified

    def samples_at(self, position: int) -> int:
        """Rounds that verified slot ``position``."""
        return sum(1 for s in self.samples if len(s.logits) > position)
