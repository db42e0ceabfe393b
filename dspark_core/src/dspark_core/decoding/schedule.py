"""Confidence schedules: how many of a proposal's tokens to verify, from the draft's confidence logits.

A schedule is one :class:`ScheduleRule` subclass registered by name with :func:`register_schedule`;
``ConfidenceSchedule(name, threshold)`` applies it, ``ConfidenceSchedule.parse`` reads the CLI's
``--schedule`` spelling (``off`` or ``NAME:T``) and :func:`schedule_names` lists the registered
rules (``dspark generate --help`` shows them). Torch is imported only when a schedule runs.

A length of 0 verifies the anchor alone, so a threshold of 1.0 degenerates to plain decoding (with
the draft's cost). Rules compare in log space in float64, so that ``sigmoid(conf) == 1.0`` after
float32 rounding does not count as reaching a threshold of 1.

A schedule may carry a calibration, one STS temperature per position (``sigmoid(c_k / T_k)``, as
``dspark calibrate`` fits and SGLang applies), and the seconds of a round at each proposal length
(``round_seconds[l] = t_draft + t_verify(l)``, from :mod:`dspark_core.decoding.costs`), which the
``cost`` rule reads. Both are per-row quantities: a batched decoder calls :meth:`proposal_length`
once per row, with ``round_seconds`` from a cost table profiled at its batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from dspark_core.errors import DraftConfigError

if TYPE_CHECKING:
    from torch import Tensor


class ScheduleRule:
    """One schedule: ``cut`` returns the number of slots to verify, given their log confidences.

    A rule that needs more than a threshold (the cost table) overrides :meth:`choose` instead, which
    sees the whole :class:`ConfidenceSchedule`.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    takes_threshold: ClassVar[bool] = True
    #: whether the rule reads the confidences at all (``off`` does not)
    reads_confidence: ClassVar[bool] = True
    #: whether the rule needs ``round_seconds`` (a cost table)
    needs_costs: ClassVar[bool] = False

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        raise NotImplementedError

    def choose(self, log_confidence: list[float], schedule: ConfidenceSchedule) -> int:
        """Slots to verify; by default :meth:`cut` at the schedule's threshold."""
        if schedule.threshold >= 1.0:
            # log sigmoid(c) is < 0 for every finite c, but may round to 0 in float64 for huge c.
            return 0
        log_threshold = math.log(schedule.threshold) if schedule.threshold > 0 else -math.inf
        return self.cut(log_confidence, log_threshold)


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
    reads_confidence = False

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


@register_schedule
class Cost(ScheduleRule):
    """The length ``l`` that maximises expected committed tokens per second of the round.

    With calibrated survival ``S_k = prod_{j<=k} sigmoid(c_j / T_j)``, a round verifying ``l`` slots
    commits ``1 + S_0 + .. + S_{l-1}`` tokens on average (the bonus or corrected token included) and
    costs ``round_seconds[l] = t_draft + t_verify(l)``. Ties go to the shorter proposal.
    """

    name = "cost"
    help = "the length maximising expected tokens per second, from the STS calibration and a cost table"
    takes_threshold = False
    needs_costs = True

    def cut(self, log_confidence: list[float], log_threshold: float) -> int:
        raise NotImplementedError("the cost rule chooses from the schedule's cost table; call choose()")

    def choose(self, log_confidence: list[float], schedule: ConfidenceSchedule) -> int:
        seconds = schedule.round_seconds
        if len(seconds) <= len(log_confidence):
            raise DraftConfigError(
                f"schedule 'cost' has round costs for lengths 0..{len(seconds) - 1} but the draft "
                f"proposed {len(log_confidence)} slots; profile a cost table for this draft "
                "(dspark_core.decoding.costs)"
            )
        expected, best_length, best_rate = 1.0, 0, 1.0 / seconds[0]
        for length, log_survival in enumerate(_running_sum(log_confidence), start=1):
            expected += math.exp(log_survival)
            rate = expected / seconds[length]
            if rate > best_rate:
                best_length, best_rate = length, rate
        return best_length


def _running_sum(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


@dataclass(frozen=True)
class ConfidenceSchedule:
    """A registered rule (``mode``) with its ``threshold`` in [0, 1]; the default verifies everything.

    ``temperatures`` (STS, one per position; positions past the list keep 1) calibrate the confidences
    every rule reads; ``round_seconds[l]`` is the cost of a round verifying ``l`` slots (``cost`` rule).
    """

    mode: str = "off"
    threshold: float = 0.0
    temperatures: tuple[float, ...] = ()
    round_seconds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in _RULES:
            names = ", ".join(repr(n) for n in _RULES)
            raise ValueError(f"schedule mode must be one of {names}, got {self.mode!r}")
        if not 0.0 <= self.threshold <= 1.0 or math.isnan(self.threshold):
            raise ValueError(f"schedule threshold must lie in [0, 1], got {self.threshold}")
        for field_name in ("temperatures", "round_seconds"):
            values = getattr(self, field_name)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"schedule {field_name} must be finite and > 0, got {list(values)}")

    def with_calibration(self, temperatures: tuple[float, ...] | list[float]) -> ConfidenceSchedule:
        """This schedule reading confidences through STS ``temperatures``."""
        return replace(self, temperatures=tuple(float(t) for t in temperatures))

    def with_costs(self, round_seconds: tuple[float, ...] | list[float]) -> ConfidenceSchedule:
        """This schedule with ``round_seconds[l]``, the seconds of a round verifying ``l`` slots."""
        return replace(self, round_seconds=tuple(float(t) for t in round_seconds))

    @property
    def needs_costs(self) -> bool:
        return _RULES[self.mode].needs_costs

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
        return _RULES[self.mode].reads_confidence

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

        logits = confidence[:num_slots].double()
        if self.temperatures:
            temps = list(self.temperatures[: logits.shape[0]])
            temps += [1.0] * (logits.shape[0] - len(temps))
            logits = logits / torch.tensor(temps, dtype=torch.float64, device=logits.device)
        log_conf = [float(v) for v in torch.nn.functional.logsigmoid(logits).tolist()]
        return min(num_slots, _RULES[self.mode].choose(log_conf, self))

    def describe(self) -> str:
        """The ``--schedule`` spelling of this schedule."""
        return self.mode if not _RULES[self.mode].takes_threshold else f"{self.mode}:{self.threshold:g}"
