"""Each rank's random streams: anchors, Python and torch, seeded from ``(seed, rank)`` and checkpointed."""

from __future__ import annotations

import random
from typing import Any

import torch

from dspark_core.training.distributed import rank_seed

__all__ = ["RngStreams"]


class RngStreams:
    """Seeds this rank's streams on construction; :meth:`state` and :meth:`restore` round-trip them."""

    def __init__(self, seed: int, rank: int, device: torch.device) -> None:
        self.device = device
        # Per rank, so that ranks sample different anchors.
        self.anchors = torch.Generator(device="cpu")
        self.anchors.manual_seed(rank_seed(seed, rank, "anchors"))
        random.seed(rank_seed(seed, rank, "python"))
        torch.manual_seed(rank_seed(seed, rank, "torch"))

    def state(self) -> dict[str, Any]:
        """This rank's RNG states, for a checkpoint."""
        state: dict[str, Any] = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "anchors": self.anchors.get_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        random.setstate(_as_tuple(state["python"]))
        torch.set_rng_state(state["torch"])
        self.anchors.set_state(state["anchors"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples; a state that went through a list-only format comes back as lists.
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value
