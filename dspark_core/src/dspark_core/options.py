"""What a user chooses: draft options, loss options, the choice lists, and device/precision resolution.

Torch-free at import, so the CLI can build its parsers and help from here cheaply. Every other module
(the draft config, the objective, the trainer's config, the CLI) reads its choices and defaults from
this one home, so adding a Markov head type or an attention path is one edit here plus its code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from dspark_core.errors import DraftConfigError
from dspark_core.validation import is_int, is_real, require_choice

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DEVICES",
    "MARKOV_HEAD_TYPES",
    "PRECISIONS",
    "PRECISION_ALIASES",
    "DSparkDraftOptions",
    "DSparkLossConfig",
    "canonical_precision",
    "confidence_schedule_names",
    "resolve_attention",
    "resolve_device",
    "resolve_dtype",
]

#: Markov head types (``markov_head_type``); their modules are in ``modeling/markov.py``.
MARKOV_HEAD_TYPES: Final[tuple[str, ...]] = ("vanilla", "gated", "rnn")
#: The draft's attention paths (``_attn_implementation``); ``auto`` picks one per device.
ATTENTION_IMPLEMENTATIONS: Final[tuple[str, ...]] = ("sdpa", "eager", "flex_attention")
DEVICES: Final[tuple[str, ...]] = ("auto", "cpu", "cuda")
#: One spelling per precision; the torch dtype names are accepted as aliases.
PRECISIONS: Final[tuple[str, ...]] = ("auto", "fp32", "bf16", "fp16")
PRECISION_ALIASES: Final[dict[str, str]] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _f(default: Any, help: str) -> Any:
    # Each option carries its help text, which the CLI turns into a flag's description.
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DSparkDraftOptions:
    """What a user chooses when building a draft; ``None`` means the method's default."""

    num_draft_layers: int = _f(5, "draft depth D")
    block_size: int = _f(7, "block size B: tokens proposed per round")
    target_layer_ids: Sequence[int] | None = _f(
        None, "target layers whose hidden states feed the draft (default: spread over its depth)"
    )
    num_feature_layers: int | None = _f(None, "number of feature layers when target_layer_ids is not given")
    mask_token_id: int | None = _f(
        None,
        "the draft's mask token id (training default: the first embedding row past the tokenizer, else the "
        "first unused special token)",
    )
    num_anchors: int = _f(512, "blocks sampled per training row (N)")
    markov_rank: int = _f(256, "rank r of the Markov head; 0 disables it")
    markov_head_type: str = _f("vanilla", f"Markov head: {', '.join(MARKOV_HEAD_TYPES)}")
    enable_confidence_head: bool = _f(True, "train a confidence head (alias: confidence_head)")
    confidence_head_with_markov: bool = _f(
        True, "the confidence head also sees the Markov embedding (always false with markov_rank 0)"
    )
    draft_vocab_size: int | None = _f(
        None,
        "reduced draft vocabulary K: the draft's own lm_head covers the K most frequent supervised target "
        "tokens (plus EOS) and maps them back with d2t; unset (or the target's vocab_size) keeps the full "
        "vocabulary",
    )


@dataclass(frozen=True)
class DSparkLossConfig:
    """Weights, decay and chunking of the DSpark objective (``modeling/loss.py``).

    ``decay_gamma=None`` weights every supervised slot equally; ``chunk_size=None`` builds the
    logits of all supervised tokens at once.
    """

    ce_weight: float = _f(0.1, "weight of the cross-entropy term")
    l1_weight: float = _f(0.9, "weight of the L1 (2 x total variation) term")
    confidence_weight: float = _f(1.0, "weight of the confidence BCE term")
    decay_gamma: float | None = _f(
        4.0, "slot weight decay exp(-k/gamma); 'none' for no decay (alias: loss_decay_gamma)"
    )
    chunk_size: int | None = _f(
        4096, "supervised tokens per vocabulary chunk of the objective (alias: loss_chunk_size)"
    )

    def __post_init__(self) -> None:
        for name in ("ce_weight", "l1_weight", "confidence_weight"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value < 0:
                raise DraftConfigError(
                    f"DSparkLossConfig.{name} must be a finite number >= 0, got {value!r}."
                )
        gamma = self.decay_gamma
        # `not gamma > 0` also rejects NaN; +inf is allowed and means no decay.
        if gamma is not None and (not is_real(gamma) or not gamma > 0):
            raise DraftConfigError(
                f"DSparkLossConfig.decay_gamma must be > 0, or None for no decay; got {gamma!r}."
            )
        chunk = self.chunk_size
        if chunk is not None and (not is_int(chunk) or chunk < 1):
            raise DraftConfigError(
                "DSparkLossConfig.chunk_size must be an integer >= 1, or None for no chunking; "
                f"got {chunk!r}."
            )


def confidence_schedule_names() -> tuple[str, ...]:
    """The registered confidence schedules (``decoding/schedule.py``), for choices and help."""
    from dspark_core.decoding.schedule import schedule_names

    names: tuple[str, ...] = tuple(schedule_names())
    return names


def canonical_precision(
    name: str, *, allowed: Sequence[str] = PRECISIONS, error: type[Exception] = DraftConfigError
) -> str:
    """``name`` in its one spelling (``float32`` -> ``fp32``); raises ``error`` if not in ``allowed``."""
    canonical = PRECISION_ALIASES.get(name, name)
    return require_choice("precision", canonical, allowed, error=error)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    import torch

    require_choice("device", name if name in DEVICES else name.split(":")[0], DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``precision`` (either spelling); ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    import torch

    canonical = canonical_precision(precision)
    if canonical == "auto":
        canonical = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[canonical]


def resolve_attention(name: str, device: torch.device) -> str:
    """``auto`` is flex attention on CUDA (its backward needs a GPU) and SDPA elsewhere."""
    if name == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    return require_choice("attn_implementation", name, ATTENTION_IMPLEMENTATIONS)
