"""The DSpark confidence head: a per-slot logit predicting whether the slot's draft token is accepted."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.validation import is_int

__all__ = ["ConfidenceHead"]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    # Autocast would silently run the projection in bf16; the logit is defined in fp32.
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class ConfidenceHead(nn.Module):
    """``conf_k = proj([h_k ; W1[prev_k]])`` with Markov features, otherwise ``proj(h_k)``.

    The projection is always computed in float32, whatever the parameter or input dtype.

    Args:
        hidden_size: H.
        markov_rank: r, the width of the Markov features; only used when ``with_markov``.
        with_markov: the config field ``confidence_head_with_markov``.
    """

    def __init__(self, hidden_size: int, markov_rank: int = 0, *, with_markov: bool = False) -> None:
        super().__init__()
        if not is_int(hidden_size) or hidden_size < 1:
            raise DraftConfigError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not is_int(markov_rank) or markov_rank < 0:
            raise DraftConfigError(f"markov_rank must be a non-negative integer, got {markov_rank!r}")
        if with_markov and markov_rank == 0:
            raise DraftConfigError(
                "confidence_head_with_markov=True needs the Markov head's features, but markov_rank=0 "
                "(no Markov head). Set markov_rank > 0 (with a markov_head_type), or set "
                "confidence_head_with_markov=False."
            )
        self.hidden_size = hidden_size
        self.with_markov = with_markov
        self.markov_rank = markov_rank if with_markov else 0
        self.proj = nn.Linear(hidden_size + self.markov_rank, 1)

    def forward(self, hidden: Tensor, markov_features: Tensor | None = None) -> Tensor:
        """Confidence logits: ``hidden [..., H]`` and ``markov_features [..., r]`` -> float32 ``[...]``.

        ``markov_features`` (``markov_head.embed_previous(prev)``) is required when the head was built
        ``with_markov`` and must be ``None`` otherwise.
        """
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be [..., {self.hidden_size}], got {tuple(hidden.shape)}")
        features = hidden.float()
        if self.with_markov:
            if markov_features is None:
                raise ValueError(
                    "this confidence head was built with confidence_head_with_markov=True: pass "
                    "markov_features=markov_head.embed_previous(prev_tokens)"
                )
            if markov_features.shape != (*hidden.shape[:-1], self.markov_rank):
                raise ValueError(
                    f"markov_features must be hidden's leading shape + [{self.markov_rank}], got "
                    f"{tuple(markov_features.shape)} for hidden {tuple(hidden.shape)}"
                )
            features = torch.cat([features, markov_features.float()], dim=-1)
        elif markov_features is not None:
            raise ValueError(
                "this confidence head was built with confidence_head_with_markov=False and takes no "
                "markov_features"
            )
        with _autocast_off(features.device.type):
            logits = F.linear(features, self.proj.weight.float(), self.proj.bias.float())
        return logits.squeeze(-1)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, with_markov={self.with_markov}, markov_rank={self.markov_rank}"
        )
