"""Confidence schedules: how many of a proposal's tokens to verify, from the draft's confidence logits.

A schedule is one :class:`ScheduleRule` subclass registered by name with :func:`register_schedule`;
``ConfidenceSchedule(name, threshold)`` applies it, ``ConfidenceSchedule.parse`` reads the CLI's
``--schedule`` spelling (``off`` or ``NAME:T``) and :func:`schedule_names` lists the registered
rules (``dspark generate --help`` shows them). Torch is imported only when a schedule runs.

A length of 0 verifies the anchor alone, so a threshold of 1.0 degenerates to plain decoding (with
the draft's cost). Rules compare in log space in float64, so that ``sigmoid(conf) == 1.0`` after
float32 rounding does not count as reaching a threshold of 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from dspark_core.errors import DraftConfigError

if TYPE_CHECKING:
    from torch import Tensor


class ScheduleRule:
    """One schedule: ``cut`` returns the number of slots to verify, given their log confidences."""

    name: ClassVar[str]
    help: ClassVar[str]
    takes_threshold: ClassVar[bool] = True

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        raise NotImplementedError


_RULES: dict[str, ScheduleRule] = {}


def register_schedule(cls: type[ScheduleRule]) -> type[ScheduleRule]:
    """Class decorator: make ``cls`` available as ``ConfidenceSchedule(cls.name, ...)``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"schedule rule {cls.__qualname__} needs a class attribute `name`")
    _RULES[cls.name] = cls()
    return cls


def schedule_names() -> tuple[str, ...]:
    """Every registered schedule, ``off`` first."""
    return tuple(_RULES)


def describe_schedules() -> str:
    """One line for ``--help``: each schedule's spelling and what it does."""
    return "; ".join(f"{n}{':T' if r.takes_threshold else ''} ({r.help})" for n, r in _RULES.items())


def _first_below(values: list[float], bound: float) -> int:
    return next((k for k, value in enumerate(values) if value < bound), len(values))


@register_schedule
class Off(ScheduleRule):
    name = "off"
    help = "verify every proposed token"
    takes_threshold = False

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        return len(log_confidence)


@register_schedule
class Position(ScheduleRule):
    name = "position"
    help = "stop at the first slot whose confidence is under T"

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        return _first_below(log_confidence, log_threshold)


@register_schedule
class Product(ScheduleRule):
    name = "product"
    help = "stop where the running product of confidences falls under T"

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        return _first_below(list(_running_sum(log_confidence)), log_threshold)


def _running_sum(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


@dataclass(frozen=True)
class ConfidenceSchedule:
    """A registered rule (``mode``) with its ``threshold`` in [0, 1]; the default verifies everything."""

    mode: str = "off"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in _RULES:
            names = ", ".join(repr(n) for n in _RULES)
            raise ValueError(f"schedule mode must be one of {names}, got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise ValueError(f"schedule threshold must lie in [0, 1], got {self.threshold}")

    @classmethod
    def parse(cls, text: str) -> ConfidenceSchedule:
        """Parse ``off`` or ``NAME:T`` (the CLI's ``--schedule``)."""
        mode, _, value = text.strip().partition(":")
        mode = mode.strip().lower()
        rule = _RULES.get(mode)
        if rule is not None and not rule.takes_threshold and not value:
            return cls(mode)
        if rule is not None and rule.takes_threshold and value:
            try:
                threshold = float(value)
            except ValueError:
                raise ValueError(f"schedule {text!r}: {value!r} is not a number") from None
            return cls(mode, threshold)
        spellings = ", ".join(repr(n if not r.takes_threshold else f"{n}:T") for n, r in _RULES.items())
        raise ValueError(f"schedule {text!r} is not one of {spellings} (T in [0, 1])")

    @property
    def enabled(self) -> bool:
        """Whether the schedule reads the confidences at all."""
        return _RULES[self.mode].takes_threshold

    def proposal_length(self, confidence: Tensor | None, num_slots: int) -> int:
        """How many of ``num_slots`` proposed tokens to verify, given ``[num_slots]`` confidence logits."""
        if not self.enabled:
            return num_slots
        if confidence is None:
            raise DraftConfigError(
                f"schedule {self.describe()!r} needs the draft's confidence head, but the draft has none "
                "(enable_confidence_head=False); use schedule 'off'"
            )
        import torch

        log_conf = [
            float(v) for v in torch.nn.functional.logsigmoid(confidence[:num_slots].double()).tolist()
        ]
        if self.threshold >= 1.0:
            # log sigmoid(c) is < 0 for every finite c, but may round to 0 in float64 for huge c.
            return 0
        log_threshold = math.log(self.threshold) if self.threshold > 0 else -math.inf
        return min(num_slots, _RULES[self.mode].cut(log_conf, log_threshold))

    def describe(self) -> str:
        """The ``--schedule`` spelling of this schedule."""
        return self.mode if not self.enabled else f"{self.mode}:{self.threshold:g}"
