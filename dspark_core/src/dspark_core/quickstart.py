"""The quickstart main job: embedded target, code data, a trained draft, held-out figures.

Four stages, each reusing its folder when its inputs are unchanged, so a second run only repeats
what changed: install the shipped pretrained target, answer code prompts with it
(:mod:`~dspark_core.datagen.code_demo`), train a draft on the answers, then evaluate the draft on
the held-out prompts with the evaluation code behind ``dspark eval --baseline``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_core.datagen.code_demo import HELDOUT_NAME, TRAIN_NAME, CodeDemoRecipe

#: The draft and its training. ``examples/quickstart.toml`` holds the same values (a test keeps
#: them equal). The target has 12 layers; these feature layers leave out layer n-1 (11), which
#: SGLang cannot capture, so training raises no serving warning.
TRAINING: dict[str, Any] = {
    "num_draft_layers": 1,
    "block_size": 8,
    "target_layer_ids": [2, 6, 10],
    "num_anchors": 64,
    "markov_rank": 64,
    "max_length": 384,
    "batch_size": 8,
    "max_steps": 300,
    "lr": 3e-3,
    "warmup_steps": 20,
    "min_lr": 3e-4,
    "log_every": 20,
    "save_every": 200,
    "seed": 0,
}
EVAL_MAX_NEW_TOKENS = 128
#: Held-out prompts decoded together: the fastest of 1, 4, 8 and 16 on two CPU cores (measured 2026-12-06:
#: the held-out evaluation with its baseline took 42.3, 12.8, 9.7 and 8.7 s end to end).
EVAL_BATCH_SIZE = 16


@dataclass
class QuickstartPaths:
    root: Path

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def draft(self) -> Path:
        return self.root / "run" / "draft"

    @property
    def results(self) -> Path:
        return self.root / "heldout.json"


def training_config(paths: QuickstartPaths, overrides: dict[str, Any] | None = None) -> Any:
    from dspark_core.training.config import TrainConfig

    return TrainConfig.from_mapping(
        {
            **TRAINING,
            **(overrides or {}),
            "target": str(paths.target),
            "data": [str(paths.data / TRAIN_NAME)],
            "output_dir": str(paths.run),
        }
    )


def trained_draft(paths: QuickstartPaths, config: Any) -> bool:
    """Whether the run folder already holds a verified export trained with exactly ``config``."""
    from dspark_core.training.checkpoint import verify_export
    from dspark_core.training.trainer import normalise_paths

    try:
        saved = json.loads((paths.run / "run.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return False
    # The export is written once, after the last step, so a valid one means the run finished.
    # The run records absolute paths; a relative DIR (the default) must compare equal to them.
    config = normalise_paths(config)
    same = not config.incompatibilities(saved) and not config.adjustments(saved)
    return same and not verify_export(paths.draft)


def train_draft(paths: QuickstartPaths, overrides: dict[str, Any] | None, log: Callable[[str], None]) -> Path:
    from dataclasses import replace

    from dspark_core.training.trainer import train

    config = training_config(paths, overrides)
    if trained_draft(paths, config):
        log(f"draft: reusing {paths.draft} (trained with the same settings)")
        return paths.draft
    result = train(replace(config, overwrite=True))
    assert result.export_dir is not None
    return result.export_dir


def heldout_prompts(paths: QuickstartPaths, tokenizer: Any) -> list[Any]:
    """The held-out prompts as ``[1, P]`` id tensors (for benchmarks that decode them one by one)."""
    import torch

    from dspark_core.training.data import encode_prompt, read_jsonl

    prompts = []
    for row in read_jsonl(paths.data / HELDOUT_NAME):
        ids = encode_prompt(tokenizer, [m.as_dict() for m in row.messages])  # type: ignore[union-attr]
        prompts.append(torch.tensor([ids], dtype=torch.long))
    return prompts


def evaluate_heldout(paths: QuickstartPaths, *, max_new_tokens: int, progress: bool) -> Any:
    """``dspark eval --baseline`` on the held-out prompts, greedy: an :class:`EvalReport`."""
    import torch
    from tqdm.auto import tqdm

    from dspark_core.evaluation.datasets import read_dataset
    from dspark_core.evaluation.runner import EvalSettings, evaluate, load_models

    target, draft, tokenizer = load_models(
        str(paths.target), str(paths.draft), device=torch.device("cpu"), dtype=torch.float32
    )
    dataset = read_dataset(paths.data / HELDOUT_NAME, name="held-out")
    # A generation config may hold one eos id or a list; the decoding loop takes either.
    eos: Any = target.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    settings = EvalSettings(
        batch_size=EVAL_BATCH_SIZE, max_new_tokens=max_new_tokens, baseline=True, eos_token_id=eos
    )
    bar = tqdm(
        total=len(dataset.conversations), desc="held-out decoding", unit="prompt", disable=not progress,
        dynamic_ncols=True,
    )  # fmt: skip
    with torch.inference_mode():
        report = evaluate(target, draft, tokenizer, [dataset], settings, on_request=bar.update)
    bar.close()
    return report


def run_quickstart(
    root: str | Path,
    *,
    data_recipe: CodeDemoRecipe | None = None,
    training_overrides: dict[str, Any] | None = None,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the four stages under ``root``; returns the held-out figures (also in ``heldout.json``)."""
    from dspark_core.datagen.code_demo import build_code_demo_data
    from dspark_core.targets.shipped import install_shipped_target

    paths = QuickstartPaths(Path(root))
    _, target_record, reused = install_shipped_target(paths.target)
    log(
        f"target: {'reusing' if reused else 'installed'} {paths.target} (pretrained Qwen3, held-out "
        f"perplexity {target_record.get('heldout_perplexity')})"
    )
    _, data_record, reused = build_code_demo_data(paths.target, paths.data, data_recipe, progress=progress)
    log(
        f"data: {'reusing' if reused else 'wrote'} {paths.data}: {data_record['num_train']} "
        "training chats from "
        f"{data_record['train_files']} files, {data_record['num_heldout']} held-out prompts from "
        f"{data_record['heldout_files']} other files"
    )
    draft_dir = train_draft(paths, training_overrides, log)
    log(f"draft: {draft_dir}")
    report = evaluate_heldout(paths, max_new_tokens=max_new_tokens, progress=progress)
    figures = {
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "batch_size": EVAL_BATCH_SIZE,
        **report.figures(0.0),
        "definitions": report.as_dict()["definitions"],
    }
    paths.results.write_text(json.dumps(figures, indent=2) + "\n")
    log(f"held-out prompts ({figures['prompts']}, never trained on), as `dspark eval --baseline` reports:")
    for line in report.table_lines():
        log("  " + line if line else "")
    return figures
