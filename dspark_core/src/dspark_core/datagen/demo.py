"""Built-in prompts for ``data: demo`` and ``eval_data: demo``: a run that needs no dataset.

The prompts are plain English, generated from a few templates, and family-agnostic: the target's
own chat template renders them and the target answers them (see :mod:`regenerate`), which is the
method's recipe on a small scale. The training and evaluation prompts do not overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspark_core.training.config import TrainConfig

__all__ = ["DEMO_DATA_NAME", "demo_prompts", "write_demo_data"]

#: Generation settings of the built-in demo data (greedy, so the data is the target's mode).
DEMO_MAX_NEW_TOKENS = 48
DEMO_BATCH_SIZE = 16

#: The value of ``data`` / ``eval_data`` that selects the built-in prompts.
DEMO_DATA_NAME = "demo"

_TOPICS = (
    "rivers",
    "the moon",
    "bread",
    "bicycles",
    "libraries",
    "autumn leaves",
    "trains",
    "gardens",
    "the ocean",
    "coffee",
    "museums",
    "stars",
    "maps",
    "rain",
    "music",
    "bridges",
)
_TEMPLATES = (
    "Tell me about {topic}.",
    "Write one sentence about {topic}.",
    "Why do people like {topic}?",
    "Give me a short tip about {topic}.",
)


def demo_prompts(split: str = "train") -> list[str]:
    """The built-in prompts of ``split`` (``train``: 70 prompts, ``eval``: 12 held-out prompts)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    topical = [t.format(topic=topic) for topic, t in itertools.product(_TOPICS, _TEMPLATES)]
    arithmetic = [f"What is {a} plus {b}?" for a, b in itertools.product(range(1, 7), range(2, 7, 2))]
    prompts = topical + arithmetic
    # Every seventh prompt is held out, so both splits cover every template.
    held_out = set(range(3, len(prompts), 7))
    chosen = [p for i, p in enumerate(prompts) if (i in held_out) == (split == "eval")]
    return chosen


def write_demo_data(
    target: Any, tokenizer: Any, path: Path, config: TrainConfig, log: Callable[[str], None]
) -> None:
    """Have ``target`` answer the built-in training prompts into ``path`` (resumable: done rows stay)."""
    from dspark_core.datagen.regenerate import SamplingConfig, chat_rows_from_prompts, regenerate
    from dspark_core.training.data import DatasetError

    if tokenizer is None:
        raise DatasetError("data 'demo' needs the target's tokenizer and chat template")
    stats = regenerate(
        target,
        tokenizer,
        chat_rows_from_prompts(demo_prompts("train")),
        path,
        sampling=SamplingConfig(max_new_tokens=DEMO_MAX_NEW_TOKENS, temperature=0.0, seed=config.seed),
        batch_size=DEMO_BATCH_SIZE,
        chat_template_kwargs=config.chat_template_kwargs,
        progress=config.progress,
    )
    if stats.rows_written:
        log(f"demo data: the target answered {stats.rows_written} built-in prompts into {path}")
