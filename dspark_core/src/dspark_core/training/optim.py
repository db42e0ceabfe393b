"""The optimiser side of training: AdamW parameter groups, the warmup-cosine schedule, clipping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dspark_core.training.config import TrainConfig

__all__ = ["WarmupCosine", "apply_learning_rate", "build_optimizer", "clip_gradients"]


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio``
    at ``total_steps``. Called with the number of optimizer steps already taken."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first step already learns instead of running at lr 0.
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: TrainConfig, *, fused: bool
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (norm weights and biases not decayed) and its schedule."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused
    )
    schedule = WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr / config.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig) -> None:
    """Re-aim a restored schedule at ``config.lr``/``min_lr`` (a resume may lower them): the scheduler's
    state holds the saved run's base rates and floor."""
    scheduler.base_lrs = [config.lr for _ in scheduler.base_lrs]
    for schedule in scheduler.lr_lambdas:
        if isinstance(schedule, WarmupCosine):
            schedule.min_ratio = config.min_lr / config.lr
    step = scheduler.last_epoch
    for group, base, schedule in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping) and return the norm before it."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    full_tensor: Any = getattr(norm, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else norm
