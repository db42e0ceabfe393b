"""Stopping a run that has gone wrong: a NaN/inf loss or gradient, or a loss far above its running median.

Both stop before the optimizer step, so the last good checkpoint stays the newest one. The loss
history is part of the checkpoint, so a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from dspark_core.errors import DSparkError

__all__ = ["LossGuard", "LossSpikeError", "NonFiniteLossError"]

_TERM_NAMES = ("loss", "ce", "l1", "confidence_loss")


class NonFiniteLossError(DSparkError, FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped without saving."""


class LossSpikeError(NonFiniteLossError):
    """The loss exceeded ``loss_spike_factor`` times its running median; training stopped without saving."""


class LossGuard:
    """Checks every step's global loss terms and gradient norm (the same values on every rank)."""

    def __init__(self, spike_factor: float, *, window: int = 64, min_history: int = 8) -> None:
        self.spike_factor = spike_factor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)

    def check(self, step: int, terms: list[float], grad_norm: float, kept: str) -> None:
        """Raise for step ``step`` (1-based) if it must not be applied; ``kept`` says what is saved."""
        detail = ", ".join(f"{n}={v:.6g}" for n, v in zip(_TERM_NAMES, terms, strict=True))
        detail += f", grad_norm={grad_norm:.6g}"
        if not all(math.isfinite(v) for v in [*terms, grad_norm]):
            raise NonFiniteLossError(f"non-finite loss at step {step} ({detail}); training stopped: {kept}")
        loss = terms[0]
        if self.spike_factor > 0 and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                raise LossSpikeError(
                    f"the loss exploded at step {step}: {loss:.6g} is over {self.spike_factor:g}x its "
                    f"running median {median:.6g} ({detail}); training stopped: {kept}. Raise "
                    "loss_spike_factor (0 disables the check) if this is expected"
                )
        self.history.append(loss)

    def state(self) -> list[float]:
        return list(self.history)

    def restore(self, history: Any) -> None:
        self.history.clear()
        self.history.extend(float(v) for v in history or [])
