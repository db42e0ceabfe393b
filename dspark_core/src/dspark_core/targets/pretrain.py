"""Family-agnostic causal-LM pretraining of a small target on the embedded corpus.

The token stream is every training-split file followed by its code tasks rendered as chats, so the
target learns the code and how to answer "Complete this Python function" in the chat format. Batches
are random windows drawn from a seeded generator: the result depends only on the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dspark_core.targets.code_tasks import code_tasks
from dspark_core.targets.corpus import Corpus, CorpusFile

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the pretrained weights (with the corpus and the family)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 64

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretraining {name} must be at least 1, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainResult:
    heldout_perplexity: float
    final_train_loss: float
    tokens_seen: int
    seconds: float


def _file_documents(files: list[CorpusFile], tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    for f in files:
        yield f.read()
        for task in code_tasks([f]):
            yield str(tokenizer.apply_chat_template(task.messages(with_answer=True), tokenize=False))


def token_stream(files: list[CorpusFile], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Every document's tokens followed by eos, concatenated into one long 1-D tensor."""
    import torch

    documents = list(_file_documents(files, tokenizer))
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    eos = int(tokenizer.eos_token_id)
    flat = [token for ids in encoded for token in (*ids, eos)]
    return torch.tensor(flat, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    import torch

    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def _learning_rate(recipe: PretrainRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def heldout_perplexity(model: Any, stream: torch.Tensor, recipe: PretrainRecipe) -> float:
    """exp(mean next-token loss) over evenly spaced held-out windows: the same windows every time."""
    import torch

    span = recipe.seq_len + 1
    count = min(recipe.eval_windows, max(1, (len(stream) - 1) // span))
    starts = torch.linspace(0, len(stream) - span - 1, count).long()
    windows: Any = _windows(stream, starts, span)
    model.eval()
    losses = []
    with torch.no_grad():
        for chunk in windows.split(16):
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone())
            losses.append(float(out.loss) * len(chunk))
    return math.exp(sum(losses) / len(windows))


def train_on_stream(
    model: Any,
    stream: torch.Tensor,
    recipe: PretrainRecipe,
    *,
    on_step: Callable[[int, float], None] | None = None,
    time_budget_s: float | None = None,
) -> tuple[int, float]:
    """Next-token training on random windows of ``stream``; returns (steps done, last loss).

    ``time_budget_s`` stops early by wall time (benchmarks that give two models equal time); without
    it the run is ``recipe.steps`` long and depends only on the recipe.
    """
    import torch

    span = recipe.seq_len
    if len(stream) <= span + 1:
        raise ValueError(f"the training stream has only {len(stream)} tokens; seq_len is {span}")
    generator = torch.Generator().manual_seed(recipe.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    started = time.perf_counter()
    loss_value, step = float("nan"), 0
    for step in range(1, recipe.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step - 1)
        starts = torch.randint(0, len(stream) - span - 1, (recipe.batch_size,), generator=generator)
        batch = _windows(stream, starts, span)
        loss = model(input_ids=batch, labels=batch.clone()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(step, loss_value)
        if time_budget_s is not None and time.perf_counter() - started >= time_budget_s:
            break
    model.eval()
    return step, loss_value


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    recipe: PretrainRecipe,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Train ``model`` in place on the corpus's training split; measure it on the held-out split."""
    started = time.perf_counter()
    train = token_stream(corpus.split("train"), tokenizer)
    heldout = token_stream(corpus.split("heldout"), tokenizer)
    steps, loss_value = train_on_stream(model, train, recipe, on_step=on_step)
    perplexity = heldout_perplexity(model, heldout, recipe)
    return PretrainResult(
        heldout_perplexity=perplexity,
        final_train_loss=loss_value,
        tokens_seen=steps * recipe.batch_size * recipe.seq_len,
        seconds=time.perf_counter() - started,
    )
