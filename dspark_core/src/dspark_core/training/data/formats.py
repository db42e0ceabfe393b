"""Reading JSONL and the row formats it may hold, behind one dispatch table.

A row's format is chosen by the one key of :data:`ROW_FORMATS` it has; a new format is one more
:class:`RowFormat` in that table. Every error names the file and 1-based line of the row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_core.training.data.rows import ChatRow, DatasetError, Message, Origin, TokenRow, where_prefix
from dspark_core.validation import is_int

__all__ = ["ROLE_ALIASES", "ROW_FORMATS", "RowFormat", "parse_row", "read_jsonl"]

#: Accepted spellings of each chat role (matched case-insensitively), and the role they mean.
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def _parse_messages(turns: object, key: str, origin: Origin | None) -> tuple[Message, ...]:
    where = where_prefix(origin)
    if not isinstance(turns, list):
        raise DatasetError(f"{where}{key!r} must be a list of turns, got {type(turns).__name__}")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}{key}[{i}] must be an object, got {type(turn).__name__}")
        # Accept either key style in either list: some DeepSpec exports use role/content too.
        if "role" in turn or "content" in turn:
            role_key, content_key = "role", "content"
        else:
            role_key, content_key = "from", "value"
        if role_key not in turn or content_key not in turn:
            raise DatasetError(
                f"{where}{key}[{i}] needs 'role' and 'content' (OpenAI form) or 'from' and 'value' "
                f"(DeepSpec form); it has {sorted(turn)}"
            )
        raw_role, content = turn[role_key], turn[content_key]
        if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_ALIASES:
            raise DatasetError(
                f"{where}{key}[{i}] has unknown role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}"
            )
        if not isinstance(content, str):
            raise DatasetError(
                f"{where}{key}[{i}].{content_key} must be a string, got {type(content).__name__}"
            )
        role = ROLE_ALIASES[raw_role.lower()]
        ids = turn.get("response_ids")
        if ids is not None and role != "assistant":
            raise DatasetError(
                f"{where}{key}[{i}] has response_ids but is a {role} turn; only assistant turns carry them"
            )
        response_ids = (
            None if ids is None else tuple(_parse_int_list(ids, f"{key}[{i}].response_ids", origin))
        )
        messages.append(Message(role, content, response_ids))
    with_ids = [m.response_ids is not None for m in messages if m.role == "assistant"]
    if any(with_ids) and not all(with_ids):
        raise DatasetError(
            f"{where}either every assistant turn carries response_ids or none does; "
            "regenerate the row, or drop response_ids from it"
        )
    return tuple(messages)


def _parse_int_list(value: object, key: str, origin: Origin | None) -> list[int]:
    where = where_prefix(origin)
    if not isinstance(value, list):
        raise DatasetError(f"{where}{key!r} must be a list of integers, got {type(value).__name__}")
    for i, item in enumerate(value):
        # A JSON true/false here is a schema mistake, not a token.
        if not is_int(item):
            raise DatasetError(f"{where}{key}[{i}] must be an integer, got {item!r}")
    return list(value)


def _parse_chat(key: str) -> Callable[[Mapping[str, Any], Origin | None], ChatRow]:
    def parse(obj: Mapping[str, Any], origin: Origin | None) -> ChatRow:
        return ChatRow(_parse_messages(obj[key], key, origin), origin)

    return parse


def _parse_tokens(obj: Mapping[str, Any], origin: Origin | None) -> TokenRow:
    where = where_prefix(origin)
    if "loss_mask" not in obj:
        raise DatasetError(f"{where}a pre-tokenised row needs 'loss_mask' next to 'input_ids'")
    input_ids = _parse_int_list(obj["input_ids"], "input_ids", origin)
    loss_mask = _parse_int_list(obj["loss_mask"], "loss_mask", origin)
    if len(input_ids) != len(loss_mask):
        raise DatasetError(
            f"{where}'input_ids' has {len(input_ids)} entries but 'loss_mask' has {len(loss_mask)}"
        )
    if any(t < 0 for t in input_ids):
        raise DatasetError(f"{where}'input_ids' contains a negative token id")
    if any(m not in (0, 1) for m in loss_mask):
        raise DatasetError(f"{where}'loss_mask' values must be 0 or 1")
    return TokenRow(input_ids, loss_mask, origin)


@dataclass(frozen=True)
class RowFormat:
    """A row format: the key that marks a row as this format, how to name it in errors, and its parser."""

    key: str
    description: str
    parse: Callable[[Mapping[str, Any], Origin | None], ChatRow | TokenRow]


#: Every row format, keyed by the row key that selects it, in the order errors list them.
ROW_FORMATS: dict[str, RowFormat] = {
    fmt.key: fmt
    for fmt in (
        RowFormat("messages", "'messages' (OpenAI chat)", _parse_chat("messages")),
        RowFormat("conversations", "'conversations' (DeepSpec chat)", _parse_chat("conversations")),
        RowFormat("input_ids", "'input_ids' + 'loss_mask' (pre-tokenised)", _parse_tokens),
    )
}


def _expected_formats() -> str:
    names = [fmt.description for fmt in ROW_FORMATS.values()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parse_row(obj: object, origin: Origin | None = None) -> ChatRow | TokenRow:
    """Validate one decoded JSON row and return it as a :class:`ChatRow` or :class:`TokenRow`."""
    where = where_prefix(origin)
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}a row must be a JSON object, got {type(obj).__name__}")
    forms = [key for key in ROW_FORMATS if key in obj]
    if len(forms) > 1:
        raise DatasetError(f"{where}a row must have exactly one of {forms}, not several")
    if forms:
        return ROW_FORMATS[forms[0]].parse(obj, origin)
    raise DatasetError(f"{where}unknown row schema with keys {sorted(obj)}: expected {_expected_formats()}")


def read_jsonl(path: str | Path) -> Iterator[ChatRow | TokenRow]:
    """Parse a JSONL file lazily, skipping blank lines; errors name the file and 1-based line."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"training data file not found: {file}")
    with file.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            origin = Origin(str(file), line_no)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{origin}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{origin}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            yield parse_row(obj, origin)
