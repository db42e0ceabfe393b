"""Training metrics: accumulation over a logging window, cross-rank reduction, and ``metrics.jsonl``.

Each line of ``metrics.jsonl`` is one logged step::

    {"step": 20, "epoch": 0, "loss": ..., "ce": ..., "l1": ..., "confidence_loss": ...,
     "alpha@0": ..., ..., "tau_proxy": ..., "confidence_ece": ..., "confidence_bias": ...,
     "lr": ..., "grad_norm": ..., "tokens": ..., "tokens_per_s": ..., "peak_memory_mb": ...,
     "elapsed_s": ...}

Loss terms are means over the window's optimizer steps; the objective's diagnostics (acceptance
proxy per slot ``alpha@k``, ``tau_proxy``, confidence calibration: teacher-forced proxies on the
training rows, not decoding) are pooled over the window as the ratio of summed
numerators to summed denominators, already summed across ranks by the objective. ``tokens`` counts
the non-padding tokens every rank read in the window, ``peak_memory_mb`` is the largest peak over
ranks. Evaluation results (``eval_tau_pooled``, ``eval_accept_rate@i``, ``eval_running_product_ece@k``:
the held-out ECE of the running product of confidences, per position, ...) join the line of their step.
``tokens_per_s`` leaves out the time spent saving checkpoints and evaluating.

Reading the file (:func:`read_metrics`) needs no torch; the accumulator imports it when built.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dspark_core.training.distributed import DistributedContext

__all__ = [
    "TIMING_KEYS",
    "MetricsLog",
    "WindowMetrics",
    "peak_memory_mb",
    "read_metrics",
]

#: Keys that depend on wall-clock time or the machine, not on what was computed.
TIMING_KEYS = frozenset({"tokens_per_s", "peak_memory_mb", "elapsed_s", "eval_tokens_per_s"})

_TERMS = ("loss", "ce", "l1", "confidence_loss")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on CUDA, peak resident set size on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class WindowMetrics:
    """Sums over the optimizer steps since the last log, kept as tensors so that steps never sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        import torch

        self.steps = 0
        self.terms = torch.zeros(len(_TERMS), dtype=torch.float64, device=self.device)
        self.diagnostics: dict[str, torch.Tensor] = {}
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a checkpoint save, an evaluation) out of the window's throughput."""
        self.excluded += seconds

    def add_micro_batch(
        self,
        terms: torch.Tensor,
        diagnostics: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        tokens: torch.Tensor,
        grad_accum: int,
    ) -> None:
        """Add one micro-batch: ``terms`` = (loss, ce, l1, confidence) already global across ranks,
        the objective's ``(numerator, denominator)`` diagnostics, and this rank's token count."""
        import torch

        self.terms += terms.detach().to(torch.float64) / grad_accum
        for name, (num, den) in diagnostics.items():
            pair = torch.stack([num.detach(), den.detach()]).to(torch.float64)
            if name in self.diagnostics:
                self.diagnostics[name] += pair
            else:
                self.diagnostics[name] = pair
        self.tokens += tokens.detach().to(torch.float64)

    def end_step(self) -> None:
        self.steps += 1

    def state(self) -> dict[str, Any]:
        """The open window's sums, for a checkpoint: a resumed run then logs the lines of an
        uninterrupted one, whatever ``log_every`` is."""
        return {
            "steps": self.steps,
            "terms": self.terms.cpu(),
            "diagnostics": {k: v.cpu() for k, v in self.diagnostics.items()},
            "tokens": self.tokens.cpu(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.terms = state["terms"].to(self.device)
        self.diagnostics = {k: v.to(self.device) for k, v in state["diagnostics"].items()}
        self.tokens = state["tokens"].to(self.device)

    def summary(self, context: DistributedContext) -> dict[str, float]:
        """The window's metrics, reduced across ranks (a collective: every rank must call it)."""
        import torch

        elapsed = time.perf_counter() - self.started - self.excluded
        local = torch.stack(
            [self.tokens, torch.tensor(peak_memory_mb(self.device), dtype=torch.float64, device=self.device)]
        )
        tokens = context.all_reduce(local[:1].clone())
        peak = context.all_reduce(local[1:].clone(), op="max")
        steps = max(self.steps, 1)
        terms = (self.terms / steps).tolist()
        out: dict[str, float] = dict(zip(_TERMS, terms, strict=True))
        for name in sorted(self.diagnostics, key=_diagnostic_order):
            num, den = self.diagnostics[name].tolist()
            out[name] = num / den if den > 0 else float("nan")
        out["tokens"] = float(tokens.item())
        out["tokens_per_s"] = out["tokens"] / elapsed if elapsed > 0 else float("nan")
        out["peak_memory_mb"] = float(peak.item())
        return out


def _diagnostic_order(name: str) -> tuple[int, int, str]:
    # alpha@0, @1, ... in numeric order, then the rest alphabetically.
    prefix = "alpha@"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return (0, int(name[len(prefix) :]), "")
    return (1, 0, name)


def _json_value(value: Any) -> Any:
    # JSON has no NaN or infinity; write null so that every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


class MetricsLog:
    """``metrics.jsonl`` of a run, appended by rank 0 (other ranks hold an inactive log)."""

    def __init__(self, path: str | Path, *, active: bool) -> None:
        self.path = Path(path)
        self.active = active

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (logged by an interrupted run past its last checkpoint),
        and a torn last line, so that a resumed run continues the file exactly."""
        if not self.active or not self.path.exists():
            return
        kept: list[str] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line)
        from dspark_core.training import faults
        from dspark_core.training.checkpoint import atomic_write_text

        faults.point("metrics-rewrite")
        # Atomic: a kill during the rewrite keeps the old file, never a shortened one.
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one line (rank 0 only) and flush it.

        A full disk raises :class:`~dspark_core.training.disk_space.DiskFullError` after cutting the
        file back to its last whole line.
        """
        if not self.active:
            return
        from dspark_core.training.disk_space import guard_disk_space

        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False)
        data = (line + "\n").encode("utf-8")
        # Unbuffered: a failed write must not be retried by close() with the bytes still buffered.
        with self.path.open("ab", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size

            def cut_back() -> None:
                os.ftruncate(handle.fileno(), size)

            with guard_disk_space(self.path, lambda: len(data), cleanup=cut_back):
                view = memoryview(data)
                while view:
                    view = view[handle.write(view) or 0 :]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``RUN_DIR/metrics.jsonl``), skipping torn lines."""
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.jsonl"
    return list(_records(file))


def _records(file: Path) -> Iterator[dict[str, Any]]:
    with file.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
