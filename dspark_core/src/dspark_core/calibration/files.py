"""Calibration files: ``sts.json`` in the schema SGLang reads, and dspark's richer report beside it.

``sts.json`` follows ``DSparkStsCalibration`` of SGLang 0.5.23
(``sglang/srt/speculative/dspark_components/dspark_sts.py``, read from the released wheel): an object
with ``temperatures`` (a non-empty list of numbers, each > 0, one per block position: SGLang refuses a
table whose length is not the runtime gamma), ``dataset`` (str), ``num_samples`` (int),
``ece_before`` and ``ece_after`` (lists of numbers). SGLang applies ``sigmoid(raw / T_k)``. JSON has no
NaN, so a position without samples reports an ECE of 0.0 there (its sample count, 0, is in
``dspark_calibration.json``).

``dspark_calibration.json`` adds per-position figures, the data fingerprint, the decoding temperature
and the sha256 of the draft's weights, so that ``check-draft`` can tell a stale calibration.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_core.errors import CalibrationError
from dspark_core.model_dirs import file_sha256

STS_FILE = "sts.json"
REPORT_FILE = "dspark_calibration.json"
REPORT_FORMAT = 1


@dataclass(frozen=True)
class StsFile:
    """The content of an ``sts.json``."""

    temperatures: tuple[float, ...]
    dataset: str = ""
    num_samples: int = 0
    ece_before: tuple[float, ...] = ()
    ece_after: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("an STS calibration needs at least one temperature")
        bad = [t for t in self.temperatures if not (math.isfinite(t) and t > 0)]
        if bad:
            raise ValueError(f"STS temperatures must be finite and > 0, got {list(self.temperatures)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperatures": [float(t) for t in self.temperatures],
            "dataset": self.dataset,
            "num_samples": int(self.num_samples),
            "ece_before": [_json_number(v) for v in self.ece_before],
            "ece_after": [_json_number(v) for v in self.ece_after],
        }


def _json_number(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def write_sts(path: Path, sts: StsFile) -> Path:
    path.write_text(json.dumps(sts.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_sts(path: Path, *, block_size: int | None = None) -> StsFile:
    """Read and check an ``sts.json`` as SGLang would; ``block_size`` also checks one temperature per
    position. Errors name the file and field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: must hold a JSON object with `temperatures`")
    temps = data.get("temperatures")
    if not isinstance(temps, list) or not temps or not all(_is_number(t) for t in temps):
        raise CalibrationError(f"{path}: `temperatures` must be a non-empty list of numbers, got {temps!r}")
    if not all(math.isfinite(t) and t > 0 for t in temps):
        raise CalibrationError(f"{path}: `temperatures` must all be > 0 (SGLang refuses others), got {temps}")
    if block_size is not None and len(temps) != block_size:
        raise CalibrationError(
            f"{path}: {len(temps)} temperatures for a draft of block_size {block_size}; SGLang needs one per "
            "position: run `dspark calibrate` again for this draft"
        )
    dataset = data.get("dataset", "")
    if not isinstance(dataset, str):
        raise CalibrationError(f"{path}: `dataset` must be a string, got {dataset!r}")
    num_samples = data.get("num_samples", 0)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool):
        raise CalibrationError(f"{path}: `num_samples` must be an integer, got {num_samples!r}")
    lists = {}
    for name in ("ece_before", "ece_after"):
        value = data.get(name, [])
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            raise CalibrationError(f"{path}: `{name}` must be a list of numbers, got {value!r}")
        lists[name] = tuple(float(v) for v in value)
    return StsFile(
        tuple(float(t) for t in temps), dataset, num_samples, lists["ece_before"], lists["ece_after"]
    )


def draft_weights_sha256(folder: Path) -> str:
    """One sha256 over the draft's weight files (``*.safetensors``, ``*.bin``), in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise CalibrationError(f"{folder}: no weight file (*.safetensors) to hash")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def write_report(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"format": REPORT_FORMAT, **report}, indent=2) + "\n", encoding="utf-8")
    return path


def read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("draft_weights_sha256"), str):
        raise CalibrationError(f"{path}: not a dspark calibration report (no `draft_weights_sha256`)")
    return data
