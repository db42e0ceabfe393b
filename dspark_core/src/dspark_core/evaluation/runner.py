"""The evaluation loop: every dataset, every temperature, in batches, speculative and plain interleaved.

Each batch is decoded by both methods back to back (with ``baseline``), the order alternating from
one batch to the next, so machine load falls on both alike; the speedup is computed from those
side-by-side wall times. With ``all_turns``, turn ``t + 1`` of a conversation is asked after the
model's own (speculative) answer to turn ``t``; both methods see the same prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dspark_core.decoding.figures import RequestRounds
from dspark_core.decoding.metrics import GenerationResult
from dspark_core.decoding.schedule import ConfidenceSchedule
from dspark_core.decoding.target import synchronize
from dspark_core.evaluation.datasets import Conversation, EvalDataset
from dspark_core.evaluation.report import BatchTiming, EvalReport, RequestOutcome
from dspark_core.training.data import DatasetError, encode_prompt

__all__ = ["EvalSettings", "evaluate", "load_models"]

#: Tokens of the untimed warm-up run of each method, so one-time setup is not billed to a batch.
_WARMUP_TOKENS = 2


@dataclass(frozen=True)
class EvalSettings:
    temperatures: tuple[float, ...] = (0.0,)
    batch_size: int = 1
    max_new_tokens: int = 128
    seed: int = 0
    schedule: str = "off"
    baseline: bool = False
    all_turns: bool = False
    eos_token_id: int | Sequence[int] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"--temperature values must be >= 0, got {list(self.temperatures)}")
        ConfidenceSchedule.parse(self.schedule)


def load_models(
    target_dir: str, draft_dir: str, *, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any, Any]:
    """The target (eval mode), its draft and its tokenizer (``None`` when the folder has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.loading import load_draft
    from dspark_core.model_dirs import require_model_dir

    folder = require_model_dir(target_dir, "--target")
    target: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    target = target.to(device).eval()
    draft = load_draft(draft_dir, target, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return target, draft, tokenizer


def _decode_batch(
    target: nn.Module, draft: nn.Module | None, prompts: list[list[int]], options: dict[str, Any]
) -> tuple[list[GenerationResult], float]:
    """One batch by one method (plain when ``draft`` is None), and its wall time."""
    from dspark_core.decoding.batched import plain_generate_batch, speculative_generate_batch

    device = next(target.parameters()).device
    synchronize(device)
    started = time.perf_counter()
    if draft is None:
        plain = {k: v for k, v in options.items() if k not in ("schedule", "check_fit")}
        results = plain_generate_batch(target, prompts, **plain)
    else:
        results = speculative_generate_batch(target, draft, prompts, **options)
    synchronize(device)
    return results, time.perf_counter() - started


class _Dialogue:
    """A conversation being evaluated: its history so far and the next turn to ask."""

    def __init__(self, conversation: Conversation):
        self.conversation = conversation
        self.history: list[dict[str, str]] = []
        self.turn = 0

    def prompt_ids(self, tokenizer: Any, template_kwargs: dict[str, Any]) -> list[int]:
        if self.conversation.prompt_ids is not None:
            return list(self.conversation.prompt_ids)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DatasetError(
                f"{self.conversation.source}: a text prompt needs the target's tokenizer and chat template "
                "(the target folder has none); give pre-tokenised rows (input_ids + loss_mask) instead"
            )
        self.history.extend({"role": r, "content": c} for r, c in self.conversation.turns[self.turn])
        return encode_prompt(tokenizer, self.history, chat_template_kwargs=template_kwargs)

    def answered(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": text})
        self.turn += 1


def evaluate(
    target: nn.Module,
    draft: nn.Module,
    tokenizer: Any,
    datasets: Sequence[EvalDataset],
    settings: EvalSettings,
    *,
    on_request: Callable[[int], object] | None = None,
) -> EvalReport:
    """Decode every dataset at every temperature; ``on_request(n)`` after each batch of ``n`` requests."""
    from dspark_core.decoding.fit import check_draft_fits_target
    from dspark_core.model_dirs import check_fits_positions

    settings.check()
    check_draft_fits_target(draft, target)
    report = EvalReport(settings=_settings_record(settings, draft))
    turns_per = (lambda c: c.num_turns) if settings.all_turns else (lambda c: 1)
    warmed = False
    batch_index = 0
    for temperature in settings.temperatures:
        options: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "temperature": temperature,
            "eos_token_id": settings.eos_token_id,
            "schedule": ConfidenceSchedule.parse(settings.schedule),
            "check_fit": False,
        }
        for dataset in datasets:
            dialogues = [_Dialogue(c) for c in dataset.conversations]
            for turn in range(max(turns_per(c) for c in dataset.conversations)):
                asked = [d for d in dialogues if turns_per(d.conversation) > turn]
                prompts = [d.prompt_ids(tokenizer, settings.chat_template_kwargs) for d in asked]
                for dialogue, ids in zip(asked, prompts, strict=True):
                    check_fits_positions(
                        len(ids), settings.max_new_tokens, target.config, dialogue.conversation.source
                    )
                if not warmed:
                    _warm_up(target, draft, prompts[0], options, settings.baseline)
                    warmed = True
                for start in range(0, len(asked), settings.batch_size):
                    chunk = slice(start, start + settings.batch_size)
                    seeded = {**options, "seed": settings.seed + batch_index}
                    outcome = _run_batch(
                        target, draft, prompts[chunk], seeded, settings.baseline, batch_index
                    )
                    spec, plain, timing = outcome
                    report.batches.append(BatchTiming(dataset.name, temperature, len(spec), *timing))
                    for i, (dialogue, result) in enumerate(zip(asked[chunk], spec, strict=True)):
                        plain_tokens = plain[i].new_tokens if plain is not None else None
                        report.requests.append(
                            _outcome(dataset.name, dialogue, turn, temperature, result, plain_tokens)
                        )
                        if tokenizer is not None and settings.all_turns:
                            dialogue.answered(
                                str(tokenizer.decode(result.new_tokens, skip_special_tokens=True))
                            )
                    batch_index += 1
                    if on_request is not None:
                        on_request(len(spec))
    return report


def _warm_up(
    target: nn.Module, draft: nn.Module, prompt: list[int], options: dict[str, Any], baseline: bool
) -> None:
    short = {**options, "max_new_tokens": min(_WARMUP_TOKENS, options["max_new_tokens"]), "seed": 0}
    _decode_batch(target, draft, [prompt], short)
    if baseline:
        _decode_batch(target, None, [prompt], short)


def _run_batch(
    target: nn.Module,
    draft: nn.Module,
    prompts: list[list[int]],
    options: dict[str, Any],
    baseline: bool,
    index: int,
) -> tuple[
    list[GenerationResult], list[GenerationResult] | None, tuple[int, float, int | None, float | None]
]:
    """Speculative (and plain, in alternating order) on one batch: results and (tokens, seconds) of each."""
    plain: list[GenerationResult] | None = None
    plain_s: float | None = None
    if baseline and index % 2 == 0:
        plain, plain_s = _decode_batch(target, None, prompts, options)
    spec, spec_s = _decode_batch(target, draft, prompts, options)
    if baseline and index % 2 == 1:
        plain, plain_s = _decode_batch(target, None, prompts, options)
    spec_tokens = sum(r.metrics.new_tokens for r in spec)
    plain_tokens = sum(r.metrics.new_tokens for r in plain) if plain is not None else None
    return spec, plain, (spec_tokens, spec_s, plain_tokens, plain_s)


def _outcome(
    dataset: str,
    dialogue: _Dialogue,
    turn: int,
    temperature: float,
    result: GenerationResult,
    plain_tokens: list[int] | None,
) -> RequestOutcome:
    metrics = result.metrics
    return RequestOutcome(
        dataset=dataset,
        source=dialogue.conversation.source,
        turn=turn,
        temperature=temperature,
        rounds=RequestRounds(
            metrics.committed_per_round, metrics.accepted_per_round, metrics.proposed_per_round
        ),
        prompt_tokens=metrics.prompt_tokens,
        new_tokens=metrics.new_tokens,
        target_forwards=metrics.target_forwards,
        token_ids=tuple(result.new_tokens),
        identical=None if plain_tokens is None else plain_tokens == result.new_tokens,
    )


def _settings_record(settings: EvalSettings, draft: nn.Module) -> dict[str, Any]:
    return {
        "temperatures": list(settings.temperatures),
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "schedule": ConfidenceSchedule.parse(settings.schedule).describe(),
        "block_size": int(getattr(draft.config, "block_size", 0)),
        "baseline": settings.baseline,
        "turns": "all" if settings.all_turns else "first",
    }
