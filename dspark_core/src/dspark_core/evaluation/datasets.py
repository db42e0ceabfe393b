"""Evaluation prompt sets read from files: DeepSpec benchmark files, chat JSONL and pre-tokenised rows.

One file is one dataset, named after the file. A line is one conversation, whose turns
are what the model is asked, in order; without ``--all-turns`` only the first turn is decoded, as
DeepSpec's evaluator does. Formats, chosen per line by the key the row has:

- ``{"turns": [str, ...]}`` (DeepSpec's benchmark files, and ``dspark generate --prompts``): each
  string is a user turn;
- a chat row (``messages`` or ``conversations``, as :mod:`~dspark_core.training.data.formats`
  reads them): the non-assistant messages between assistant turns form one turn each; the
  dataset's own assistant answers are dropped, the model answers instead;
- a pre-tokenised row (``input_ids`` + ``loss_mask``): the ids before the first supervised one are
  the prompt (one turn; no tokenizer needed).

Every malformed row raises one :class:`~dspark_core.training.data.DatasetError` naming ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dspark_core.training.data.formats import parse_row
from dspark_core.training.data.rows import ChatRow, DatasetError, Origin

__all__ = ["Conversation", "EvalDataset", "read_dataset", "read_datasets"]

#: A turn: the messages appended to the conversation before the model answers.
Turn = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Conversation:
    """One evaluation line: its turns as (role, content) messages, or its prompt ids."""

    source: str
    turns: tuple[Turn, ...] = ()
    prompt_ids: tuple[int, ...] | None = None

    @property
    def num_turns(self) -> int:
        return 1 if self.prompt_ids is not None else len(self.turns)


@dataclass(frozen=True)
class EvalDataset:
    name: str
    path: str
    conversations: tuple[Conversation, ...]


def _deepspec_turns(value: object, where: str) -> tuple[Turn, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise DatasetError(
            f'{where}: "turns" must be a non-empty list of non-empty strings, as in DeepSpec\'s '
            'benchmark files ({"turns": ["first question", ...]})'
        )
    return tuple(((("user", text),)) for text in value)


def _chat_turns(row: ChatRow, where: str) -> tuple[Turn, ...]:
    turns: list[Turn] = []
    pending: list[tuple[str, str]] = []
    for message in row.messages:
        if message.role == "assistant":
            if pending:
                turns.append(tuple(pending))
            pending = []
        else:
            pending.append((message.role, message.content))
    if pending:
        turns.append(tuple(pending))
    turns = [turn for turn in turns if any(role == "user" for role, _ in turn)]
    if not turns:
        raise DatasetError(f"{where}: the chat row has no user turn to answer; give it a user message")
    return tuple(turns)


def _token_prompt(input_ids: Sequence[int], loss_mask: Sequence[int], where: str) -> tuple[int, ...]:
    prompt_length = next((i for i, m in enumerate(loss_mask) if m), len(loss_mask))
    if prompt_length == 0:
        raise DatasetError(
            f"{where}: the pre-tokenised row has no prompt (its first token is supervised); the prompt is "
            "the ids before the first loss_mask 1"
        )
    return tuple(input_ids[:prompt_length])


def _parse_line(line: str, origin: Origin) -> Conversation:
    where = str(origin)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, dict) and "turns" in obj:
        return Conversation(where, turns=_deepspec_turns(obj["turns"], where))
    try:
        row = parse_row(obj, origin)
    except DatasetError as exc:
        raise DatasetError(f'{exc} (or {{"turns": [str, ...]}}, a DeepSpec benchmark row)') from None
    if isinstance(row, ChatRow):
        return Conversation(where, turns=_chat_turns(row, where))
    return Conversation(where, prompt_ids=_token_prompt(row.input_ids, row.loss_mask, where))


def read_dataset(path: str | Path, *, limit: int | None = None, name: str | None = None) -> EvalDataset:
    """The first ``limit`` conversations of a JSONL file (all without a limit); blank lines skipped."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"evaluation data file not found: {file}")
    conversations: list[Conversation] = []
    with file.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if limit is not None and len(conversations) >= limit:
                break
            origin = Origin(str(file), line_no)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{origin}: not valid UTF-8 (byte at column {exc.start + 1})") from None
            if line.strip():
                conversations.append(_parse_line(line, origin))
    if not conversations:
        raise DatasetError(f"{file}: no rows (expected one JSON object per line)")
    return EvalDataset(name or file.stem, str(file), tuple(conversations))


def read_datasets(paths: Sequence[str | Path], *, limit: int | None = None) -> list[EvalDataset]:
    """One dataset per file; two files with the same stem are told apart by their folder."""
    stems = [Path(p).stem for p in paths]
    datasets = []
    for path, stem in zip(paths, stems, strict=True):
        name = stem if stems.count(stem) == 1 else f"{Path(path).parent.name}/{stem}"
        datasets.append(read_dataset(path, limit=limit, name=name))
    return datasets
