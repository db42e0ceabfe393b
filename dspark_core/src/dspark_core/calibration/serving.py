"""What ``dspark check-draft`` says about a draft folder's calibration (torch-free).

When the folder holds ``sts.json`` it is checked against SGLang's schema and the draft's block size,
and ``dspark_calibration.json``'s weight hash is compared with the draft's weights: a draft retrained
or re-exported since calibration has a stale calibration. The serving flags are those of SGLang
0.5.23 (``--speculative-dspark-confidence-sts-path``; ragged verify through the environment variable
``SGLANG_RAGGED_VERIFY_MODE``, ``compact`` or ``cap-accept``, read from
``sglang/srt/speculative/ragged_verify.py``) and vLLM's ``"enable_adaptive_verification": true`` in
``--speculative-config`` (vLLM PR #47808); vLLM reads the head's raw confidences and no STS file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_core.calibration.files import REPORT_FILE, STS_FILE, draft_weights_sha256, read_report, read_sts
from dspark_core.errors import CalibrationError


@dataclass
class CalibrationStatus:
    """``state``: ``none`` (no sts.json), ``ok``, ``stale``, ``unverified`` (no report to compare) or
    ``invalid``."""

    state: str
    lines: list[str] = field(default_factory=list)
    sglang_command: str | None = None
    vllm_speculative_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "lines": self.lines,
            "sglang_command": self.sglang_command,
            "vllm_speculative_config": self.vllm_speculative_config,
        }


def calibration_status(
    folder: Path, block_size: int | None, vllm_config: dict[str, Any] | None = None
) -> CalibrationStatus:
    """The calibration found in ``folder`` (see the module docstring); ``vllm_config`` is the draft's
    vLLM speculative config, if vLLM can load it."""
    sts_path = folder / STS_FILE
    if not sts_path.is_file():
        return CalibrationStatus(
            "none", [f"no {STS_FILE}: run `dspark calibrate` to calibrate the confidence head for serving"]
        )
    try:
        sts = read_sts(sts_path, block_size=block_size)
    except CalibrationError as exc:
        return CalibrationStatus("invalid", [str(exc)])
    temps = ", ".join(f"{t:.2f}" for t in sts.temperatures)
    lines = [f"{sts_path.name}: STS temperatures [{temps}] from {sts.num_samples} rounds of {sts.dataset!r}"]
    state = "ok"
    report_path = folder / REPORT_FILE
    if not report_path.is_file():
        state = "unverified"
        lines.append(f"no {REPORT_FILE} beside it: cannot tell whether the draft's weights changed since")
    else:
        try:
            recorded = read_report(report_path)["draft_weights_sha256"]
            current = draft_weights_sha256(folder)
        except CalibrationError as exc:
            return CalibrationStatus("invalid", [*lines, str(exc)])
        if recorded != current:
            state = "stale"
            lines.append(
                f"STALE: the draft's weights changed since calibration (sha256 {recorded[:12]} recorded, "
                f"{current[:12]} now): run `dspark calibrate` again before serving with it"
            )
        else:
            lines.append("calibration matches the draft's weights (sha256)")
    command = (
        f"SGLANG_RAGGED_VERIFY_MODE=compact python -m sglang.launch_server --model-path TARGET "
        f"--speculative-algorithm DSPARK --speculative-draft-model-path {folder.resolve()} "
        f"--speculative-dspark-confidence-sts-path {sts_path.resolve()}"
    )
    lines.append(
        "SGLang ragged verify (SGLANG_RAGGED_VERIFY_MODE=compact or cap-accept) reads it; without "
        "--speculative-dspark-sps-table-path (sglang.benchmark.dspark_sps_profiler) the budget verifies all"
    )
    adaptive = None if vllm_config is None else {**vllm_config, "enable_adaptive_verification": True}
    return CalibrationStatus(state, lines, command if state != "stale" else None, adaptive)


def status_lines(status: CalibrationStatus) -> list[str]:
    """check-draft's text output for the calibration."""
    out = [f"calibration: {status.state}"] + [f"  {line}" for line in status.lines]
    if status.sglang_command:
        out.append(f"  SGLang: {status.sglang_command}")
    if status.vllm_speculative_config is not None:
        import json

        out.append(
            "  vLLM adaptive verification (uses the raw head, no STS file): "
            f"--speculative-config '{json.dumps(status.vllm_speculative_config)}'"
        )
    return out
