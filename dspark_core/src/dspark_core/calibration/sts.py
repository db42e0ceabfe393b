"""Sequential temperature scaling (STS): one temperature per block position, fitted greedily in order.

For position k, with ``T_0 .. T_{k-1}`` already fixed, ``T_k`` is the grid value that minimises the
ECE of the running product ``S_k = prod_{j<=k} sigmoid(c_j / T_j)`` against ``accepted > k`` on the
rounds that verified slot k. Fitting in order matters: ``S_k`` depends on every earlier temperature,
so each position is fitted on top of the calibrated prefix. A position without samples keeps 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark_core.calibration.metrics import DEFAULT_BINS, expected_calibration_error
from dspark_core.calibration.records import CalibrationRecords


def default_grid(low: float = 0.05, high: float = 20.0, steps: int = 121) -> list[float]:
    """Geometrically spaced temperatures (1.0 is on the grid: it is the no-change choice)."""
    ratio = math.log(high / low) / (steps - 1)
    grid = sorted({round(low * math.exp(ratio * i), 6) for i in range(steps)} | {1.0})
    return grid


@dataclass(frozen=True)
class StsFit:
    temperatures: tuple[float, ...]
    ece_before: tuple[float, ...]  # NaN where a position had no sample
    ece_after: tuple[float, ...]
    samples: tuple[int, ...]


def fit_sts(
    records: CalibrationRecords, grid: Sequence[float] | None = None, bins: int = DEFAULT_BINS
) -> StsFit:
    """Fit one temperature per position (see the module docstring); ties go to the value nearest 1."""
    grid = list(grid) if grid is not None else default_grid()
    if not grid or any(not (t > 0 and math.isfinite(t)) for t in grid):
        raise ValueError("the temperature grid must hold finite values > 0")
    # Nearest-to-1 first, so that the first minimum found is the least change.
    grid.sort(key=lambda t: abs(math.log(t)))
    logits, accepted, verified = records.as_tensors()
    temperatures: list[float] = []
    before: list[float] = []
    after: list[float] = []
    samples: list[int] = []
    prefix = torch.zeros(len(records.samples), dtype=torch.float64)  # log S_{k-1} with the fitted T's
    identity_prefix = torch.zeros_like(prefix)
    for k in range(records.block_size):
        rows = verified > k
        labels = (accepted[rows] > k).double()
        samples.append(int(rows.sum()))
        column = logits[rows, k]
        identity_prefix += torch.nn.functional.logsigmoid(logits[:, k]) * rows
        before.append(expected_calibration_error(identity_prefix[rows].exp(), labels, bins))
        if not bool(rows.any()):
            temperatures.append(1.0)
            after.append(float("nan"))
            continue
        best_t, best_ece = 1.0, math.inf
        for t in grid:
            ece = expected_calibration_error(
                (prefix[rows] + torch.nn.functional.logsigmoid(column / t)).exp(), labels, bins
            )
            if ece < best_ece - 1e-12:
                best_t, best_ece = t, ece
        temperatures.append(best_t)
        after.append(best_ece)
        prefix += torch.nn.functional.logsigmoid(logits[:, k] / best_t) * rows
    return StsFit(tuple(temperatures), tuple(before), tuple(after), tuple(samples))
