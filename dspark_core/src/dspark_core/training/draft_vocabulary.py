"""Which target tokens a reduced-vocabulary draft keeps: the K most frequent supervised tokens.

A supervised token is ``input_ids[t]`` where ``loss_mask[t]`` is 1: exactly the labels the draft is
trained to propose. The required tokens (EOS, so that the draft can propose the end of a reply) come
first; the rest are ranked by count, most frequent first, ties broken by the lower token id. When the
data has fewer distinct supervised tokens than that, the lowest unused ids fill the remainder (the
draft never learns to propose them, but K stays what was asked for).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from dspark_core.errors import DraftConfigError
from dspark_core.training.data import Example, PackedRow

__all__ = ["DraftVocabulary", "select_draft_vocabulary", "supervised_token_counts"]


@dataclass(frozen=True)
class DraftVocabulary:
    """The chosen target ids (ascending) and how much of the supervised data they cover."""

    token_ids: list[int]
    covered: int  # supervised tokens whose id is kept
    supervised: int  # all supervised tokens
    filled: int  # ids added without any supervised occurrence

    @property
    def coverage(self) -> float:
        return self.covered / self.supervised if self.supervised else 0.0


def supervised_token_counts(rows: Iterable[Example | PackedRow], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: how often each token id is a supervised label in ``rows``."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in rows:
        ids = torch.tensor(row.input_ids, dtype=torch.long)
        mask = torch.tensor(row.loss_mask, dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def select_draft_vocabulary(
    counts: torch.Tensor, size: int, *, required: Sequence[int] = (), excluded: Sequence[int] = ()
) -> DraftVocabulary:
    """The ``size`` target ids to keep, from ``counts`` (see the module docstring for the order).

    ``required`` ids are always kept; ``excluded`` ids (the mask token) never are.
    """
    vocab_size = int(counts.numel())
    must = sorted({int(i) for i in required if 0 <= int(i) < vocab_size} - {int(i) for i in excluded})
    if size < len(must) or size > vocab_size - len(set(excluded)):
        raise DraftConfigError(
            f"draft_vocab_size {size} cannot hold the {len(must)} required token(s) {must} (EOS) within a "
            f"vocabulary of {vocab_size}; choose a draft_vocab_size in [{len(must)}, {vocab_size})"
        )
    # Rank by count descending, then id ascending: a stable sort of ids by -count does both.
    score = counts.clone().to(torch.long)
    score[list(excluded)] = -1
    score[must] = -1  # placed already
    order = torch.sort(-score, stable=True).indices
    free = [int(i) for i in order[: size - len(must)]]
    chosen = sorted(must + free)
    kept = torch.tensor(chosen, dtype=torch.long)
    filled = sum(1 for i in free if int(counts[i]) == 0)
    return DraftVocabulary(
        token_ids=chosen,
        covered=int(counts[kept].sum()),
        supervised=int(counts.sum()),
        filled=filled,
    )
