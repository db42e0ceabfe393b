"""The cost table of the ``cost`` schedule: what a proposal and a verify of ``l`` tokens cost here.

A short warm-up profile on the running machine: one draft proposal of ``block_size`` slots (after a
few new context rows, as in a steady round) and one target verify forward of ``l + 1`` tokens for
every ``l = 0 .. block_size``, each the median of a few timed repeats after a warm-up call, over a
cached context of ``context_tokens`` positions. Timings depend on the architectures, the device,
the dtypes and the batch size, not on weight values, so the table is keyed by
(target config, draft config, device, dtypes, batch size) and cached as JSON: a cached table is
reused while its key matches, and profiled again (overwriting it) when it does not.

Batch > 1 is the same profile over ``[batch, l + 1]`` verify inputs (``batch_size``); the batched
decoder calls the schedule once per row, which then reads the table of that batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dspark_core.decoding.target import forward_kwargs, synchronize
from dspark_core.errors import CalibrationError, warn_at_caller

__all__ = ["CostKey", "CostTable", "cost_key", "default_cache_dir", "load_or_profile_costs", "profile_costs"]

COST_TABLE_FORMAT = 1
#: context rows a steady round feeds the draft (about one round's committed tokens)
NEW_CONTEXT_ROWS = 4


@dataclass(frozen=True)
class CostKey:
    """What the timings depend on."""

    target: str  # sha256 of the target's config
    draft: str  # sha256 of the draft's config
    device: str
    dtype: str  # "target dtype/draft dtype"
    batch_size: int


@dataclass(frozen=True)
class CostTable:
    key: CostKey
    draft_s: float  # one proposal of block_size slots
    verify_s: tuple[float, ...]  # a verify forward of l + 1 tokens, l = 0 .. block_size
    context_tokens: int
    measured_at: str

    def round_seconds(self) -> tuple[float, ...]:
        """``t_draft + t_verify(l)`` for ``l = 0 .. block_size``: what the ``cost`` schedule reads."""
        return tuple(self.draft_s + v for v in self.verify_s)

    def as_dict(self) -> dict[str, Any]:
        return {"format": COST_TABLE_FORMAT, **asdict(self), "verify_s": list(self.verify_s)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> CostTable:
        try:
            if data.get("format") != COST_TABLE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(
                key=CostKey(**data["key"]),
                draft_s=float(data["draft_s"]),
                verify_s=tuple(float(v) for v in data["verify_s"]),
                context_tokens=int(data["context_tokens"]),
                measured_at=str(data["measured_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"{source}: not a dspark cost table ({exc}); delete it to profile again"
            ) from None


def _config_sha(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    data = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    data.pop("_name_or_path", None)
    data.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    processor = platform.processor() or "cpu"
    return f"{device.type}:{platform.machine()}:{processor}:{torch.get_num_threads()} threads"


def cost_key(target: nn.Module, draft: nn.Module, *, batch_size: int = 1) -> CostKey:
    target_param = next(target.parameters())
    draft_param = next(draft.parameters())
    return CostKey(
        target=_config_sha(target),
        draft=_config_sha(draft),
        device=_device_name(target_param.device),
        dtype=f"{target_param.dtype}/{draft_param.dtype}".replace("torch.", ""),
        batch_size=batch_size,
    )


def _median_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    call()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.no_grad()
def profile_costs(
    target: nn.Module,
    draft: nn.Module,
    *,
    batch_size: int = 1,
    context_tokens: int = 128,
    repeats: int = 5,
) -> CostTable:
    """Measure one proposal and a verify of ``l + 1`` tokens for each ``l`` (see the module docstring)."""
    from transformers import DynamicCache

    config: Any = draft.config
    block_size = int(config.block_size)
    vocab = int(config.vocab_size)
    device = next(target.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (batch_size, context_tokens + block_size + 1), generator=generator).to(
        device
    )
    cache_kwarg, _ = forward_kwargs(type(target).forward)
    cache = DynamicCache(config=getattr(target, "config", None))
    positions = torch.arange(context_tokens, device=device).expand(batch_size, -1)
    target(input_ids=ids[:, :context_tokens], position_ids=positions, use_cache=True, **{cache_kwarg: cache})

    def verify(length: int) -> Callable[[], object]:
        def call() -> object:
            span = torch.arange(context_tokens, context_tokens + length + 1, device=device).expand(
                batch_size, -1
            )
            out = target(
                input_ids=ids[:, context_tokens : context_tokens + length + 1],
                position_ids=span,
                use_cache=True,
                output_hidden_states=True,
                **{cache_kwarg: cache},
            )
            cache.crop(-(length + 1))
            return out

        return call

    verify_s = tuple(_median_seconds(verify(length), device, repeats) for length in range(block_size + 1))

    draft_param = next(draft.parameters())
    width = len(config.target_layer_ids) * int(config.hidden_size)
    features = torch.randn(batch_size, context_tokens + NEW_CONTEXT_ROWS, width, generator=generator)
    features = features.to(device=draft_param.device, dtype=draft_param.dtype)
    draft_cache = draft.new_cache()  # type: ignore[operator]
    anchors = ids[:, 0].to(draft_param.device)
    draft.propose(anchors, features[:, :context_tokens], draft_cache)  # type: ignore[operator]
    draft_cache.settle_at(context_tokens)

    def propose() -> object:
        out = draft.propose(anchors, features[:, context_tokens:], draft_cache)  # type: ignore[operator]
        draft_cache.crop(context_tokens)
        return out

    draft_s = _median_seconds(propose, draft_param.device, repeats)
    return CostTable(
        key=cost_key(target, draft, batch_size=batch_size),
        draft_s=draft_s,
        verify_s=verify_s,
        context_tokens=context_tokens,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def default_cache_dir() -> Path:
    """``$DSPARK_CACHE_DIR``, else ``$XDG_CACHE_HOME/dspark``, else ``~/.cache/dspark``."""
    explicit = os.environ.get("DSPARK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "dspark"


def cost_table_path(cache_dir: Path, key: CostKey) -> Path:
    """One file per (target, draft) pair: another device, dtype or batch size refreshes it."""
    pair = hashlib.sha256(f"{key.target}:{key.draft}".encode()).hexdigest()[:20]
    return cache_dir / "cost_tables" / f"{pair}.json"


def load_or_profile_costs(
    target: nn.Module,
    draft: nn.Module,
    *,
    batch_size: int = 1,
    cache_dir: Path | None = None,
    refresh: bool = False,
    **profile_options: Any,
) -> tuple[CostTable, bool]:
    """The cached table when its key matches this (target, draft, device, dtype, batch size), else a new
    profile written over it. Returns ``(table, reused)``."""
    key = cost_key(target, draft, batch_size=batch_size)
    path = cost_table_path(cache_dir or default_cache_dir(), key)
    if path.is_file() and not refresh:
        try:
            cached = CostTable.from_dict(json.loads(path.read_text(encoding="utf-8")), path)
        except (CalibrationError, json.JSONDecodeError):
            cached = None
        if cached is not None and cached.key == key:
            return cached, True
    table = profile_costs(target, draft, batch_size=batch_size, **profile_options)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(table.as_dict(), indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return table, False


def prepare_cost_schedule(
    schedule: Any,
    target: nn.Module,
    draft: nn.Module,
    *,
    draft_dir: Path | None,
    batch_size: int = 1,
    cache_dir: Path | None = None,
    refresh: bool = False,
    **profile_options: Any,
) -> tuple[Any, dict[str, Any]]:
    """A ``cost`` schedule made ready to run: STS temperatures from ``draft_dir/sts.json`` (identity
    when there is none, reported) and the cost table of this machine. Other schedules pass through.

    Returns ``(schedule, info)``; ``info`` names the calibration file and holds the cost table. For
    :func:`~dspark_core.decoding.batched.speculative_generate_batch` pass its ``batch_size``: each row's
    choice then reads the costs of a verify at that batch size.
    """
    from dspark_core.calibration.files import STS_FILE, read_sts

    if not schedule.needs_costs:
        return schedule, {}
    info: dict[str, Any] = {"calibration": None}
    block_size = int(draft.config.block_size)  # type: ignore[union-attr,arg-type]
    sts_path = None if draft_dir is None else Path(draft_dir) / STS_FILE
    if sts_path is not None and sts_path.is_file():
        sts = read_sts(sts_path, block_size=block_size)
        schedule = schedule.with_calibration(sts.temperatures)
        info["calibration"] = str(sts_path)
    else:
        warn_at_caller(
            f"schedule 'cost' found no {STS_FILE} in {draft_dir}: it reads the head's uncalibrated "
            "confidences; run `dspark calibrate` on held-out prompts first",
            UserWarning,
        )
    table, reused = load_or_profile_costs(
        target, draft, batch_size=batch_size, cache_dir=cache_dir, refresh=refresh, **profile_options
    )
    info["cost_table"] = {**table.as_dict(), "reused": reused}
    return schedule.with_costs(table.round_seconds()), info
