"""Calibration figures of the running product of confidences, one block position at a time.

The confidence head predicts, for slot k, whether the target accepts the draft's token there. What a
scheduler uses is the *survival* probability, the running product ``S_k = prod_{j<=k} sigmoid(c_j / T_j)``:
the chance that slots 0..k are all accepted. Its label for a round is ``accepted > k``, known for every
round that verified slot k. All figures here are of that product, the quantity SGLang's ragged verify
and the ``cost`` schedule consume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dspark_core.calibration.records import CalibrationRecords

#: equal-width probability bins for the ECE (the common choice, and SGLang's fit default)
DEFAULT_BINS = 15


def _as_double(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def expected_calibration_error(
    probs: Sequence[float] | Tensor, labels: Sequence[float] | Tensor, bins: int = DEFAULT_BINS
) -> float:
    """``sum_b n_b / N * |mean p_b - mean y_b|`` over ``bins`` equal-width bins of [0, 1] (p = 1 in the
    last bin); NaN without samples."""
    p, y = _as_double(probs), _as_double(labels)
    if p.numel() == 0:
        return float("nan")
    index = (p * bins).long().clamp(0, bins - 1)
    p_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, p)
    y_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, y)
    return float((p_sum - y_sum).abs().sum() / p.numel())


def brier_score(probs: Sequence[float] | Tensor, labels: Sequence[float] | Tensor) -> float:
    """Mean squared difference between predicted probability and outcome; NaN without samples."""
    p, y = _as_double(probs), _as_double(labels)
    return float(((p - y) ** 2).mean()) if p.numel() else float("nan")


def auroc(scores: Sequence[float] | Tensor, labels: Sequence[float] | Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, tied scores share their mean rank); ``None`` when the
    labels are all one class."""
    s, y = _as_double(scores), _as_double(labels) > 0.5
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    order = torch.argsort(s, stable=True)
    sorted_scores = s[order]
    ranks = torch.empty_like(s)
    start = 0
    n = s.numel()
    # Average ranks over runs of equal scores.
    while start < n:
        end = start
        while end + 1 < n and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = float(ranks[y].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def log_survival(logits: Tensor, temperatures: Sequence[float]) -> Tensor:
    """``[N, B]`` running sums of ``log sigmoid(c_k / T_k)`` (NaN-free for any finite logits)."""
    temps = torch.as_tensor(list(temperatures), dtype=torch.float64)
    return torch.nn.functional.logsigmoid(logits / temps).cumsum(dim=1)


def survival_at(
    records: CalibrationRecords, temperatures: Sequence[float], position: int
) -> tuple[Tensor, Tensor]:
    """(``S_k`` of every round that verified slot ``position``, its label ``accepted > position``)."""
    logits, accepted, verified = records.as_tensors()
    rows = verified > position
    if not bool(rows.any()):
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    # Slots past a round's verified length hold 0 logits; they never enter S_k for k < verified.
    survival = log_survival(logits[rows][:, : position + 1], temperatures[: position + 1])[:, -1].exp()
    return survival, (accepted[rows] > position).double()


@dataclass(frozen=True)
class PositionFigures:
    """The running product's calibration at one block position."""

    position: int
    samples: int
    accept_rate: float  # the mean label: the observed survival
    mean_predicted: float
    ece: float
    brier: float
    auroc: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "samples": self.samples,
            "observed_survival": _finite(self.accept_rate),
            "mean_predicted_survival": _finite(self.mean_predicted),
            "ece": _finite(self.ece),
            "brier": _finite(self.brier),
            "auroc": self.auroc,
        }


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def position_figures(
    records: CalibrationRecords, temperatures: Sequence[float], bins: int = DEFAULT_BINS
) -> list[PositionFigures]:
    """ECE, Brier and AUROC of the running product at each of the ``block_size`` positions."""
    figures = []
    for k in range(records.block_size):
        probs, labels = survival_at(records, temperatures, k)
        count = int(probs.numel())
        figures.append(
            PositionFigures(
                position=k,
                samples=count,
                accept_rate=float(labels.mean()) if count else float("nan"),
                mean_predicted=float(probs.mean()) if count else float("nan"),
                ece=expected_calibration_error(probs, labels, bins),
                brier=brier_score(probs, labels),
                auroc=auroc(probs, labels),
            )
        )
    return figures


def reliability_bins(
    probs: Tensor, labels: Tensor, bins: int = DEFAULT_BINS
) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, count) of each non-empty bin: a reliability diagram's points."""
    index = (probs * bins).long().clamp(0, bins - 1)
    points = []
    for b in range(bins):
        chosen = index == b
        count = int(chosen.sum())
        if count:
            points.append((float(probs[chosen].mean()), float(labels[chosen].mean()), count))
    return points
