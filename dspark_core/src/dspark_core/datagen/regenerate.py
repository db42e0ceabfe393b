"""Regenerate a chat dataset's assistant turns with the target itself.

Training on the target's own outputs is what the method calls for: the draft learns the
distribution it will be verified against. :func:`regenerate` reads chat rows (OpenAI ``messages``
or DeepSpec ``conversations``), and for every row replaces each assistant turn, in order, by the
target's response to the conversation before it (the earlier turns already regenerated); a row
that ends with a user turn gets a response appended. Rows are processed in batches (left padding);
each output line is::

    {"messages": [...], "row": 12, "source": "data.jsonl:13"}

``row`` is the 0-based index of the input row over all input files. Output is appended batch by
batch and flushed, so the command is resumable: the rows already written are skipped, and a torn
last line from a killed run is dropped first. Each batch samples from its own seed (derived
from ``seed`` and its first row), so a run resumed at a batch boundary writes what an uninterrupted
run would have written. :mod:`dspark_core.datagen.server` answers the same rows through a serving
engine instead, sharing this module's reading, resuming and writing (:func:`regeneration_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dspark_core.model_dirs import check_fits_positions
from dspark_core.modeling.sampling import check_sampling_options
from dspark_core.training.data import ChatRow, DatasetError, Message, TokenRow, encode_prompt, read_jsonl
from dspark_core.training.distributed import rank_seed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "RegenerateStats",
    "RegenerationRun",
    "SamplingConfig",
    "chat_rows_from_prompts",
    "conversation_plan",
    "generate_responses",
    "regenerate",
    "regenerate_rows",
    "regeneration_run",
    "resume_point",
    "written_rows",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How the target samples its responses; ``temperature=0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling_options(self.temperature, self.top_k, self.top_p)


@dataclass
class RegenerateStats:
    """Counts of one :func:`regenerate` call."""

    rows_read: int = 0
    rows_written: int = 0
    rows_already_done: int = 0
    rows_skipped_no_prompt: int = 0
    turns_generated: int = 0
    tokens_generated: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _eos_ids(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    generation_config = getattr(target, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for token in [source] if isinstance(source, int) else list(source):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


@torch.no_grad()
def generate_responses(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    sampling: SamplingConfig,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[list[str], int]:
    """The target's next assistant turn for each conversation, generated as one left-padded batch.

    Returns the decoded responses (special tokens removed, cut at the first end-of-sequence token)
    and the number of tokens generated. ``seed`` seeds sampling for this batch.
    """
    ids, generated = generate_response_ids(
        target, tokenizer, conversations, sampling, chat_template_kwargs=chat_template_kwargs, seed=seed
    )
    return [str(tokenizer.decode(row, skip_special_tokens=True)) for row in ids], generated


def generate_response_ids(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    sampling: SamplingConfig,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[list[list[int]], int]:
    """As :func:`generate_responses`, but the target's own token ids (cut before the first eos).

    Decoding them to text and tokenising again does not always give them back (a split UTF-8 byte
    becomes U+FFFD), so training rows that should be the target's output keep these ids.
    """
    prompts: list[list[int]] = []
    for conversation in conversations:
        ids = encode_prompt(tokenizer, conversation, chat_template_kwargs=chat_template_kwargs)
        check_fits_positions(len(ids), sampling.max_new_tokens, target.config, "regenerate")
        prompts.append(ids)
    device = next(target.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DatasetError("the tokenizer has neither a pad nor an eos token to pad the batch with")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    eos = _eos_ids(target, tokenizer)
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.temperature > 0,
        "pad_token_id": int(pad_id),
        "eos_token_id": eos or None,
    }
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        # Greedy: clear sampling defaults a target's generation_config may carry.
        options.update(temperature=None, top_p=None, top_k=None)
    with contextlib.ExitStack() as stack:
        if seed is not None and sampling.temperature > 0:
            # A private RNG stream per batch: resumed output equals uninterrupted output.
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
        output = target.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
        )
    new_tokens = output[:, width:].tolist()
    responses: list[list[int]] = []
    generated = 0
    for row in new_tokens:
        cut = next((i for i, token in enumerate(row) if token in eos), len(row))
        generated += min(cut + 1, len(row))
        responses.append([int(t) for t in row[:cut]])
    return responses, generated


def regenerate_rows(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[ChatRow],
    sampling: SamplingConfig,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[list[list[dict[str, Any]]], int, int]:
    """Regenerate the assistant turns of ``rows`` (one batch). Returns the new conversations, the
    number of turns generated and the number of tokens generated.

    Turn by turn: every row with an assistant turn still to write contributes its conversation so
    far to one batched generation, so a batch needs as many generations as its longest row has
    assistant turns.
    """
    plans = [conversation_plan(row) for row in rows]
    pending = [[i for i, m in enumerate(plan) if m["role"] == "assistant"] for plan in plans]
    turns_done = 0
    tokens = 0
    round_index = 0
    while any(pending):
        members = [r for r, todo in enumerate(pending) if todo]
        contexts = [plans[r][: pending[r][0]] for r in members]
        batch_seed = None if seed is None else rank_seed(seed, round_index, "regenerate")
        replies, generated = generate_response_ids(
            target, tokenizer, contexts, sampling, chat_template_kwargs=chat_template_kwargs, seed=batch_seed
        )
        for r, reply in zip(members, replies, strict=True):
            turn = plans[r][pending[r].pop(0)]
            # The ids are what the trainer uses: decoding and re-tokenising does not always return them.
            turn["content"] = str(tokenizer.decode(reply, skip_special_tokens=True))
            turn["response_ids"] = reply
        turns_done += len(members)
        tokens += generated
        round_index += 1
    return plans, turns_done, tokens


def _written_lines(path: Path) -> list[tuple[int, str]]:
    """The complete lines of a regenerate output file, after removing a torn last line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        # A run killed while writing: keep everything up to the last complete line.
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    return [(n, line) for n, line in enumerate(data.decode("utf-8").splitlines(), start=1) if line.strip()]


def written_rows(output_path: str | Path) -> set[int]:
    """The input ``row`` indices already in ``output_path`` (a torn last line is removed first).

    Resuming skips exactly these rows, so rows that failed (on a server) are retried by the next run
    even when later rows were written.
    """
    path = Path(output_path)
    rows: set[int] = set()
    for line_no, line in _written_lines(path):
        try:
            rows.add(int(json.loads(line)["row"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"{path}:{line_no}: not a line written by regenerate ({exc}); cannot resume into this file"
            ) from exc
    return rows


def resume_point(output_path: str | Path) -> int:
    """The last input ``row`` index already in ``output_path`` (-1 when none).

    A torn last line (a run killed while writing) is removed from the file first.
    """
    return max(written_rows(output_path), default=-1)


def _chat_rows(paths: Sequence[str | Path]) -> Iterator[tuple[int, ChatRow | TokenRow]]:
    index = 0
    for path in paths:
        for row in read_jsonl(path):
            yield index, row
            index += 1


def _input_rows(
    inputs: str | Path | Sequence[str | Path] | Iterable[ChatRow],
) -> Iterable[tuple[int, ChatRow | TokenRow]]:
    if isinstance(inputs, str | Path):
        return _chat_rows([inputs])
    if isinstance(inputs, Sequence) and all(isinstance(p, str | Path) for p in inputs):
        return _chat_rows([p for p in inputs if isinstance(p, str | Path)])
    return enumerate(inputs)  # type: ignore[arg-type]


def _rows_to_answer(
    source: Iterable[tuple[int, ChatRow | TokenRow]],
    *,
    done: Container[int],
    limit: int | None,
    stats: RegenerateStats,
    skipped: Callable[[int], object],
) -> Iterator[tuple[int, ChatRow]]:
    """The rows still to answer: not past ``limit``, not already written, with a user turn."""
    for index, row in source:
        if limit is not None and index >= limit:
            return
        stats.rows_read += 1
        if index in done:
            stats.rows_already_done += 1
            skipped(1)
            continue
        if isinstance(row, TokenRow):
            raise DatasetError(
                f"{row.origin or f'row {index}'}: regenerate needs chat rows, not pre-tokenised ones"
            )
        if not any(m.role == "user" for m in row.messages):
            stats.rows_skipped_no_prompt += 1
            skipped(1)
            continue
        yield index, row


def conversation_plan(row: ChatRow) -> list[dict[str, Any]]:
    """A row's turns as dicts, with an empty assistant turn appended when it ends on another role.

    Every assistant turn of the plan is to be (re)written by the target, in order.
    """
    turns: list[dict[str, Any]] = [m.as_dict() for m in row.messages]
    if turns and turns[-1]["role"] != "assistant":
        turns.append({"role": "assistant", "content": ""})
    return turns


@dataclass
class RegenerationRun:
    """One regenerate call's shared state: the rows still to answer, the output file and the counts.

    Both generators (in process, and through a server) answer ``rows`` and hand each answered row to
    :meth:`write`, then call :meth:`commit`, which makes everything written so far durable.
    """

    rows: Iterator[tuple[int, ChatRow]]
    stats: RegenerateStats
    bar: Any
    handle: Any

    def write(self, index: int, row: ChatRow, messages: Sequence[Mapping[str, Any]]) -> None:
        record = {"messages": list(messages), "row": index, "source": str(row.origin) if row.origin else None}
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stats.rows_written += 1

    def commit(self, rows: int) -> None:
        """Flush and fsync (so a resumed run skips exactly what is on disk); advance the bar."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.bar.update(rows)

    def note(self, message: str) -> None:
        """Print a line above the progress bar."""
        self.bar.write(message, file=sys.stderr)


@contextlib.contextmanager
def regeneration_run(
    inputs: str | Path | Sequence[str | Path] | Iterable[ChatRow],
    output_path: str | Path,
    *,
    limit: int | None,
    progress: bool,
    stats: RegenerateStats | None = None,
) -> Iterator[RegenerationRun]:
    """Open ``output_path`` for appending, after the rows it already holds, with a progress bar.

    ``stats`` (a fresh :class:`RegenerateStats` by default) receives the counts.
    """
    from tqdm.auto import tqdm

    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = written_rows(output)
    stats = RegenerateStats() if stats is None else stats
    bar = tqdm(total=limit, desc="regenerate", unit="row", disable=not progress, dynamic_ncols=True)
    try:
        with output.open("a", encoding="utf-8") as handle:
            rows = _rows_to_answer(
                _input_rows(inputs), done=done, limit=limit, stats=stats, skipped=bar.update
            )
            yield RegenerationRun(rows, stats, bar, handle)
    finally:
        bar.close()


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.chat_template is None:
        raise DatasetError(
            "the tokenizer has no chat template, so chat rows cannot be rendered for the target; set "
            "tokenizer.chat_template"
        )


def regenerate(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: str | Path | Sequence[str | Path] | Iterable[ChatRow],
    output_path: str | Path,
    *,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> RegenerateStats:
    """Write ``output_path`` (JSONL): the rows of ``inputs`` with the target's own assistant turns.

    ``inputs`` are JSONL paths (chat rows; pre-tokenised rows are an error) or chat rows in memory.
    Resumes an existing ``output_path``; ``limit`` stops after that many input rows (counted from
    the first input row, done or not).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_chat_template(tokenizer)
    sampling = sampling or SamplingConfig()
    was_training = target.training
    target.eval()

    def answer(run: RegenerationRun, batch: Sequence[tuple[int, ChatRow]]) -> None:
        conversations, turns, tokens = regenerate_rows(
            target,
            tokenizer,
            [row for _, row in batch],
            sampling,
            chat_template_kwargs=chat_template_kwargs,
            seed=rank_seed(sampling.seed, batch[0][0], "regenerate-batch"),
        )
        for (index, row), messages in zip(batch, conversations, strict=True):
            run.write(index, row, messages)
        run.stats.turns_generated += turns
        run.stats.tokens_generated += tokens
        run.commit(len(batch))

    try:
        with regeneration_run(inputs, output_path, limit=limit, progress=progress) as run:
            batch: list[tuple[int, ChatRow]] = []
            for item in run.rows:
                batch.append(item)
                if len(batch) == batch_size:
                    answer(run, batch)
                    batch = []
            if batch:
                answer(run, batch)
    finally:
        target.train(was_training)
    return run.stats


def chat_rows_from_prompts(prompts: Iterable[str], system: str | None = None) -> list[ChatRow]:
    """Chat rows holding one user turn each (and an optional system turn), for :func:`regenerate`."""
    rows = []
    for prompt in prompts:
        messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
        rows.append(ChatRow(messages))
    return rows
