"""Periodic evaluation: decode held-out prompts with the real speculative loop (``eval_*`` metrics:
``eval_tau_pooled``, ``eval_tau_mean_per_request``, ``eval_accept_rate@k``, as
:mod:`dspark_core.decoding.figures` defines them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dspark_core.calibration.metrics import position_figures
from dspark_core.calibration.records import CalibrationRecords
from dspark_core.datagen.demo import DEMO_DATA_NAME, demo_prompts
from dspark_core.training.config import TrainConfig
from dspark_core.training.data import DatasetError, encode_prompt, prompt_turns, read_jsonl
from dspark_core.training.distributed import DistributedContext, rank_seed

__all__ = ["Evaluator", "load_eval_prompts"]


def load_eval_prompts(config: TrainConfig, tokenizer: Any) -> list[list[int]]:
    """The token ids of up to ``eval_prompts`` held-out prompts (``[]`` without ``eval_every``)."""
    if not config.eval_every:
        return []
    if tokenizer is None:
        raise DatasetError("evaluation needs the target's tokenizer and chat template")
    conversations: list[list[dict[str, str]]] = []
    if config.eval_data == DEMO_DATA_NAME:
        conversations = [[{"role": "user", "content": p}] for p in demo_prompts("eval")]
    elif config.eval_data is not None:
        for row in read_jsonl(config.eval_data):
            messages = getattr(row, "messages", None)
            if messages is None:
                raise DatasetError(f"{row.origin}: evaluation prompts must be chat rows")
            prompt = prompt_turns(messages)
            if any(m["role"] == "user" for m in prompt):
                conversations.append(prompt)
            if len(conversations) == config.eval_prompts:
                break
    prompts = [
        encode_prompt(tokenizer, conversation, chat_template_kwargs=config.chat_template_kwargs)
        for conversation in conversations[: config.eval_prompts]
    ]
    if not prompts:
        raise DatasetError(f"no evaluation prompt (a chat row with a user turn) in {config.eval_data}")
    return prompts


class Evaluator:
    """Decodes ``prompts`` with the draft being trained; a collective (every rank calls :meth:`run`).

    With DDP the prompts are split over ranks; with FSDP every rank decodes them all (a sharded
    forward needs every rank).
    """

    def __init__(self, config: TrainConfig, prompts: list[list[int]], ctx: DistributedContext, *, fsdp: bool):
        self.config = config
        self.prompts = prompts
        self.ctx = ctx
        self.fsdp = fsdp

    def run(self, target: nn.Module, draft: Any) -> dict[str, Any]:
        from dspark_core.decoding import combine_metrics, figures, speculative_generate

        prompts = self.prompts if self.fsdp else self.prompts[self.ctx.rank :: self.ctx.world_size]
        draft.eval()
        if self.fsdp:
            # Decoding calls the layers directly, so the root's own parameters must be gathered first.
            draft.unshard()
        results = []
        records = CalibrationRecords(block_size=int(draft.config.block_size))
        try:
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    result = speculative_generate(
                        target,
                        draft,
                        torch.tensor([prompt], device=self.ctx.device),
                        max_new_tokens=self.config.eval_max_new_tokens,
                        temperature=self.config.eval_temperature,
                        seed=rank_seed(self.config.seed, i, "eval"),
                        on_round=records.add_round,
                    )
                    results.append(result.metrics)
        finally:
            if self.fsdp:
                draft.reshard()
            draft.train()
        gathered = (
            results if self.fsdp else [m for part in self.ctx.all_gather_objects(results) for m in part]
        )
        if not self.fsdp:
            samples = [s for part in self.ctx.all_gather_objects(records.samples) for s in part]
            records = CalibrationRecords(records.block_size, samples)
        # Named as in dspark_core.decoding.figures, with the eval_ prefix (runs before them logged eval_tau).
        combined = combine_metrics(gathered)
        requests = [m.request_rounds() for m in gathered]
        out: dict[str, Any] = {
            "eval_tau_pooled": figures.tau_pooled(requests),
            "eval_tau_mean_per_request": figures.tau_mean_per_request(requests),
            "eval_tokens_per_s": combined.tokens_per_s,
        }
        for i, rate in enumerate(figures.accept_rates(requests)):
            out[f"eval_accept_rate@{i}"] = rate
        out.update(running_product_ece(records))
        return out


def running_product_ece(records: CalibrationRecords) -> dict[str, float | None]:
    """``eval_running_product_ece@k``: the ECE of the uncalibrated running product of the confidence head's
    sigmoids at position k against "the first k+1 proposals were accepted", over the held-out rounds that
    verified slot k (``None`` without such a round). Empty for a draft without a confidence head."""
    if not records.samples:
        return {}
    per_position = position_figures(records, [1.0] * records.block_size)
    return {f"eval_running_product_ece@{f.position}": (f.ece if f.samples else None) for f in per_position}
