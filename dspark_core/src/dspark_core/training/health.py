"""Stopping a run that has gone wrong: a NaN/inf loss or gradient, or a loss far above its usual scale.

The spike check watches from step 2: a loss over ``loss_spike_factor`` times the run's first loss
(the initial-loss scale, before any update) stops the run at once, and once a few steps are known,
so does a loss over the factor times the running median. A running median alone would be blind for
its first steps, and an explosion in those steps poisons the median itself.

Every check stops before the optimizer step, so the last good checkpoint stays the newest one. The
loss history and the first loss are part of the checkpoint, so a resumed run makes the same
decisions as an uninterrupted one.
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
    """The loss exceeded ``loss_spike_factor`` times its first value or its running median; training
    stopped without saving."""


class LossGuard:
    """Checks every step's global loss terms and gradient norm (the same values on every rank)."""

    def __init__(self, spike_factor: float, *, window: int = 64, min_history: int = 8) -> None:
        self.spike_factor = spike_factor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.first_loss: float | None = None

    def check(self, step: int, terms: list[float], grad_norm: float, kept: str) -> None:
        """Raise for step ``step`` (1-based) if it must not be applied; ``kept`` says what is saved."""
        detail = ", ".join(f"{n}={v:.6g}" for n, v in zip(_TERM_NAMES, terms, strict=True))
        detail += f", grad_norm={grad_norm:.6g}"
        if not all(math.isfinite(v) for v in [*terms, grad_norm]):
            raise NonFiniteLossError(f"non-finite loss at step {step} ({detail}); training stopped: {kept}")
        loss = terms[0]
        advice = "Raise loss_spike_factor (0 disables the check) if this is expected"
        factor = self.spike_factor
        if factor > 0 and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if loss > factor * median:
                raise LossSpikeError(
                    f"the loss exploded at step {step}: {loss:.6g} is over {factor:g}x its running "
                    f"median {median:.6g} ({detail}); training stopped: {kept}. {advice}"
                )
        if factor > 0 and self.first_loss is not None and loss > factor * self.first_loss:
            raise LossSpikeError(
                f"the loss exploded at step {step}: {loss:.6g} is over {factor:g}x the first step's loss "
                f"{self.first_loss:.6g} ({detail}); training stopped: {kept}. {advice}"
            )
        if self.first_loss is None:
            self.first_loss = loss
        self.history.append(loss)

    def state(self) -> list[float]:
        return list(self.history)

    def restore(self, history: Any, *, first_loss: Any = None) -> None:
        """Continue from a checkpoint's history; one saved before the first loss was recorded takes
        the oldest loss it kept."""
        self.history.clear()
        self.history.extend(float(v) for v in history or [])
        if first_loss is not None:
            self.first_loss = float(first_loss)
        else:
            self.first_loss = self.history[0] if self.history else None
