"""``make_tiny_target``: the embedded targets, random or pretrained, saved like any HF model.

A pretrained build writes ``dspark_target.json`` beside the weights: the family, shape, recipe,
corpus record and held-out perplexity. A repeat call with the same arguments on the same corpus
finds that record and reuses the folder instead of training again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark_core.targets.builders import TinyTargetShape, build_tiny_model
from dspark_core.targets.code_tasks import CODE_TASK_FORMAT
from dspark_core.targets.corpus import Corpus
from dspark_core.targets.pretrain import PretrainRecipe, PretrainResult, pretrain
from dspark_core.targets.tokenizer import EOS_TOKEN, IM_END, train_chat_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

RECORD_NAME = "dspark_target.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class PretrainedTargetSpec:
    """The arguments of a pretrained build: together with the corpus they decide the weights."""

    family: str = "qwen3"
    bpe_vocab_size: int = 4089  # + 7 special tokens = 4096
    hidden_size: int = 128
    num_layers: int = 12
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    recipe: PretrainRecipe = field(default_factory=PretrainRecipe)
    save_dtype: str = "bfloat16"  # halves the file; the model is loaded and run in fp32
    code_task_format: int = CODE_TASK_FORMAT

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "recipe"}
        out["recipe"] = self.recipe.as_dict()
        return out


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert isinstance(eos, int) and isinstance(im_end, int)
    return eos, im_end


def _shape(tokenizer: PreTrainedTokenizerFast, **sizes: Any) -> TinyTargetShape:
    eos, _ = _special_ids(tokenizer)
    # Qwen has no BOS token in text; its config names <|endoftext|> as bos, so do the same.
    return TinyTargetShape(
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def save_random_target(
    output_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast,
    builder: Callable[[TinyTargetShape], PreTrainedModel],
    shape_overrides: dict[str, Any],
    seed: int = 0,
    logit_scale: float = 1.0,
) -> Path:
    """A randomly initialised target from ``builder``; ``logit_scale`` sharpens its output head."""
    import torch

    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    shape = _shape(tokenizer, **shape_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(shape)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)  # type: ignore[no-untyped-call]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_random_target(
    output_dir: str | Path, *, family: str, vocab_size: int, seed: int, logit_scale: float, **sizes: Any
) -> Path:
    """The random tiny target of ``family`` (tokenizer from the built-in tiny text), for fast tests."""
    from dspark_core.targets.builders import tiny_target_builders
    from dspark_core.targets.tiny_text import tiny_corpus

    tiny_target_builders()  # fail early, naming the known families, before training a tokenizer
    tokenizer = train_chat_tokenizer(tiny_corpus(), vocab_size)
    return save_random_target(
        output_dir,
        tokenizer=tokenizer,
        builder=lambda shape: build_tiny_model(family, shape, seed),
        shape_overrides=sizes,
        seed=seed,
        logit_scale=logit_scale,
    )


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The build record of a target folder, or None when it has none or it is unreadable."""
    path = Path(directory) / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def reusable(directory: str | Path, spec: PretrainedTargetSpec, corpus: Corpus) -> dict[str, Any] | None:
    """The folder's record when it was built from ``spec`` on this corpus and its weights are there."""
    record = read_record(directory)
    if record is None or not (Path(directory) / "model.safetensors").is_file():
        return None
    if record.get("spec") != spec.as_dict() or record.get("corpus") != corpus.record():
        return None
    return record


def make_pretrained_target(
    output_dir: str | Path,
    spec: PretrainedTargetSpec,
    *,
    corpus: Corpus | None = None,
    on_step: Callable[[int, float], None] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Pretrain the target of ``spec``, or reuse an identical earlier build: (dir, record, reused)."""
    import torch

    corpus = corpus or Corpus.stdlib()
    out = Path(output_dir)
    previous = reusable(out, spec, corpus)
    if previous is not None:
        return out, previous, True
    tokenizer = train_chat_tokenizer(corpus.texts("train"), spec.bpe_vocab_size)
    shape = _shape(
        tokenizer,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
    )
    model = build_tiny_model(spec.family, shape, spec.recipe.seed)
    with torch.random.fork_rng(devices=[]):
        result = pretrain(model, tokenizer, corpus, spec.recipe, on_step=on_step)
    _, im_end = _special_ids(tokenizer)
    # A chat reply ends at <|im_end|>; plain text at <|endoftext|>.
    model.generation_config.eos_token_id = [im_end, shape.eos_token_id]
    model.generation_config.pad_token_id = shape.pad_token_id
    record = _record(spec, corpus, result, extra_record)
    _save_atomically(out, model.to(getattr(torch, spec.save_dtype)), tokenizer, record)
    return out, record, False


def _record(
    spec: PretrainedTargetSpec, corpus: Corpus, result: PretrainResult, extra: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "kind": "pretrained",
        "spec": spec.as_dict(),
        "corpus": corpus.record(),
        "heldout_perplexity": round(result.heldout_perplexity, 4),
        "final_train_loss": round(result.final_train_loss, 4),
        "tokens_seen": result.tokens_seen,
        "pretrain_seconds": round(result.seconds, 1),
        **(extra or {}),
    }


def _save_atomically(
    out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, record: dict[str, Any]
) -> None:
    """Write into a sibling folder, then swap it in: an interrupted build never leaves half a target."""
    import shutil

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)


def with_recipe(spec: PretrainedTargetSpec, **changes: Any) -> PretrainedTargetSpec:
    """``spec`` with some recipe fields changed (e.g. fewer steps for a quick build)."""
    return replace(spec, recipe=replace(spec.recipe, **changes))
