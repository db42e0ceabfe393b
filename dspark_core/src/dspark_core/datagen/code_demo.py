"""The quickstart's data: code-completion chats from the embedded corpus, answered by the target.

Train prompts come from the corpus's training files and held-out prompts from its held-out files
(:mod:`dspark_core.targets.corpus` splits by file), so no function is seen on both sides. Both are
chosen from the corpus alone, evenly spread over its files, before any training: the held-out set
is fixed by the corpus and ``num_heldout``, and is never used to choose settings.

The assistant turns are the target's own greedy replies, stored as text and as ``response_ids``,
so the draft trains on exactly the tokens the target produced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dspark_core.model_dirs import file_sha256
from dspark_core.targets.code_tasks import CODE_TASK_FORMAT, CodeTask, code_tasks
from dspark_core.targets.corpus import Corpus

RECORD_NAME = "data.json"
# 2: prompts over max_prompt_tokens are left out before the even spread, so the counts hold
# (1 counted a tokenizer's BatchEncoding keys, not its tokens, and left nothing out).
SELECTION_FORMAT = 2
TRAIN_NAME = "train.jsonl"
HELDOUT_NAME = "heldout.jsonl"


@dataclass(frozen=True)
class CodeDemoRecipe:
    """What decides the data (with the corpus and the target)."""

    num_train: int = 1200
    num_heldout: int = 40
    max_new_tokens: int = 64
    batch_size: int = 32
    max_prompt_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spread(tasks: Sequence[CodeTask], count: int) -> list[CodeTask]:
    """``count`` tasks evenly spaced over ``tasks`` (all of them when there are fewer)."""
    if count >= len(tasks):
        return list(tasks)
    step = len(tasks) / count
    return [tasks[int(i * step)] for i in range(count)]


def select_tasks(
    corpus: Corpus, recipe: CodeDemoRecipe, fits: Callable[[CodeTask], bool] | None = None
) -> tuple[list[CodeTask], list[CodeTask]]:
    """(train tasks, held-out tasks), from disjoint files, among the tasks that ``fits`` accepts.

    Depends on nothing but the corpus and ``fits`` (the prompt-length limit): no model output.
    """
    keep = fits or (lambda _: True)
    train = spread([t for t in code_tasks(corpus.split("train")) if keep(t)], recipe.num_train)
    heldout = spread([t for t in code_tasks(corpus.split("heldout")) if keep(t)], recipe.num_heldout)
    return train, heldout


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)


def prompt_fits(task: CodeTask, tokenizer: Any, limit: int) -> bool:
    """Whether the task's prompt, as the target's chat template encodes it, has at most ``limit`` tokens."""
    from dspark_core.training.data import encode_prompt

    return len(encode_prompt(tokenizer, task.messages(with_answer=False))) <= limit


def answer_tasks(
    target: Any,
    tokenizer: Any,
    tasks: Sequence[CodeTask],
    recipe: CodeDemoRecipe,
    on_batch: Callable[[int], object] | None = None,
) -> list[dict[str, Any]]:
    """Chat rows whose assistant turn is the target's greedy reply, with its token ids."""
    from dspark_core.datagen.regenerate import SamplingConfig, generate_response_ids

    sampling = SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=0.0)
    rows = []
    for start in range(0, len(tasks), recipe.batch_size):
        batch = tasks[start : start + recipe.batch_size]
        ids, _ = generate_response_ids(
            target, tokenizer, [t.messages(with_answer=False) for t in batch], sampling
        )
        for task, reply in zip(batch, ids, strict=True):
            text = str(tokenizer.decode(reply, skip_special_tokens=True))
            assistant = {"role": "assistant", "content": text, "response_ids": reply}
            rows.append({"messages": [*task.messages(with_answer=False), assistant], "source": task.source})
        if on_batch is not None:
            on_batch(len(batch))
    return rows


def existing_record(directory: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The data folder's record when it was built from the same inputs and its files are intact."""
    try:
        record = json.loads((directory / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("inputs") != expected:
        return None
    for name, digest in record.get("files_sha256", {}).items():
        if not (directory / name).is_file() or file_sha256(directory / name) != digest:
            return None
    return record


def build_code_demo_data(
    target_dir: str | Path,
    output_dir: str | Path,
    recipe: CodeDemoRecipe | None = None,
    *,
    progress: bool = True,
) -> tuple[Path, dict[str, Any], bool]:
    """Write ``heldout.jsonl`` (prompts) and ``train.jsonl`` (answered chats): (dir, record, reused)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe or CodeDemoRecipe()
    corpus = Corpus.stdlib()
    out = Path(output_dir)
    target_files = {p.name: file_sha256(p) for p in sorted(Path(target_dir).glob("*.safetensors"))}
    inputs = {
        "recipe": recipe.as_dict(),
        "corpus": corpus.record(),
        "code_task_format": CODE_TASK_FORMAT,
        "selection_format": SELECTION_FORMAT,
        "target_weights_sha256": target_files,
    }
    previous = existing_record(out, inputs)
    if previous is not None:
        return out, previous, True
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    train, heldout = select_tasks(
        corpus, recipe, fits=lambda task: prompt_fits(task, tokenizer, recipe.max_prompt_tokens)
    )
    out.mkdir(parents=True, exist_ok=True)
    # The held-out prompts are written first, from the corpus alone: they are fixed before training.
    _write_jsonl(
        out / HELDOUT_NAME, [{"messages": t.messages(with_answer=False), "source": t.source} for t in heldout]
    )
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    bar = tqdm(total=len(train), desc="answer prompts", unit="row", disable=not progress, dynamic_ncols=True)
    rows = answer_tasks(target, tokenizer, train, recipe, on_batch=bar.update)
    bar.close()
    _write_jsonl(out / TRAIN_NAME, rows)
    record = {
        "inputs": inputs,
        "num_train": len(rows),
        "num_heldout": len(heldout),
        "train_files": len({t.source.rsplit(":", 1)[0] for t in train}),
        "heldout_files": len({t.source.rsplit(":", 1)[0] for t in heldout}),
        "files_sha256": {name: file_sha256(out / name) for name in (TRAIN_NAME, HELDOUT_NAME)},
    }
    (out / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out, record, False
