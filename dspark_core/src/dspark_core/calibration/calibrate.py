"""The ``dspark calibrate`` job: decode held-out prompts, record confidences, fit STS, write the files.

Calibration must be fitted on prompts disjoint from those any figure is later reported on: the
temperatures are fitted to this data, so ECE measured on it is optimistic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.calibration.files import (
    REPORT_FILE,
    STS_FILE,
    StsFile,
    draft_weights_sha256,
    write_report,
    write_sts,
)
from dspark_core.calibration.metrics import DEFAULT_BINS, PositionFigures, position_figures
from dspark_core.calibration.records import CalibrationRecords
from dspark_core.calibration.sts import StsFit, fit_sts

DISJOINT_NOTE = (
    "calibrate on prompts disjoint from the ones you evaluate on: the temperatures are fitted to this "
    "data, so figures measured on it are optimistic"
)


def collect_records(
    target: nn.Module,
    draft: nn.Module,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int,
    temperatures: Sequence[float] = (0.0,),
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    on_prompt: Callable[[int], object] | None = None,
) -> CalibrationRecords:
    """Decode every prompt at every temperature with the schedule off; keep each round's confidences."""
    from dspark_core.decoding import speculative_generate

    if getattr(draft, "confidence_head", None) is None:
        raise ValueError(
            "the draft has no confidence head (enable_confidence_head=False): nothing to calibrate"
        )
    records = CalibrationRecords(block_size=int(draft.config.block_size))  # type: ignore[union-attr,arg-type]
    done = 0
    with torch.inference_mode():
        for temperature in temperatures:
            for index, prompt in enumerate(prompts):
                speculative_generate(
                    target,
                    draft,
                    prompt,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed + index,
                    eos_token_id=eos_token_id,
                    on_round=records.add_round,
                    check_fit=done == 0,
                )
                done += 1
                if on_prompt is not None:
                    on_prompt(done)
    return records


@dataclass(frozen=True)
class Calibration:
    fit: StsFit
    before: list[PositionFigures]
    after: list[PositionFigures]
    rounds: int


def calibrate_records(records: CalibrationRecords, bins: int = DEFAULT_BINS) -> Calibration:
    if not records.samples:
        raise ValueError("no verify round was recorded: give prompts that decode at least two tokens")
    fit = fit_sts(records, bins=bins)
    before = position_figures(records, [1.0] * records.block_size, bins)
    after = position_figures(records, fit.temperatures, bins)
    return Calibration(fit, before, after, len(records.samples))


def fingerprint(prompts: Sequence[Tensor], settings: dict[str, Any]) -> str:
    """sha256 of the prompt ids and the decoding settings: which data the calibration saw."""
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for prompt in prompts:
        digest.update(b"|" + ",".join(str(int(t)) for t in prompt.reshape(-1).tolist()).encode())
    return digest.hexdigest()


def write_calibration(
    out_dir: Path,
    calibration: Calibration,
    *,
    dataset: str,
    draft_dir: Path,
    data_fingerprint: str,
    settings: dict[str, Any],
) -> tuple[Path, Path]:
    """Write ``sts.json`` (SGLang's schema) and ``dspark_calibration.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = calibration.fit
    sts = StsFile(
        temperatures=fit.temperatures,
        dataset=dataset,
        num_samples=calibration.rounds,
        ece_before=fit.ece_before,
        ece_after=fit.ece_after,
    )
    sts_path = write_sts(out_dir / STS_FILE, sts)
    report = {
        "what": "STS calibration of the confidence head: per-position figures of the running product of "
        "sigmoid(c_k / T_k) against 'accepted > k', on the rounds that verified slot k",
        "note": DISJOINT_NOTE,
        "draft": str(draft_dir.resolve()),
        "draft_weights_sha256": draft_weights_sha256(draft_dir),
        "dataset": dataset,
        "data_fingerprint": data_fingerprint,
        "settings": settings,
        "rounds": calibration.rounds,
        "temperatures": list(fit.temperatures),
        "positions": [
            {"before": b.as_dict(), "after": a.as_dict(), "temperature": t}
            for b, a, t in zip(calibration.before, calibration.after, fit.temperatures, strict=True)
        ],
    }
    return sts_path, write_report(out_dir / REPORT_FILE, report)


def table_lines(calibration: Calibration) -> list[str]:
    """The per-position table: samples, temperature, ECE / Brier / AUROC before and after."""

    def number(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None or value != value else format(value, spec)

    lines = [
        "pos  samples  survival     T    ECE before -> after   Brier before -> after   AUROC before -> after"
    ]
    for b, a, t in zip(calibration.before, calibration.after, calibration.fit.temperatures, strict=True):
        lines.append(
            f"{b.position:>3}  {b.samples:>7}  {number(b.accept_rate):>8}  {t:>5.2f}    "
            f"{number(b.ece):>6} -> {number(a.ece):<6}      {number(b.brier):>6} -> {number(a.brier):<6}"
            f"         {number(b.auroc):>6} -> {number(a.auroc):<6}"
        )
    return lines
