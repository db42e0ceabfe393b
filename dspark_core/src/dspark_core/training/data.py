"""The family-agnostic dataset layer of DSpark training.

Input is JSONL, one example per line (blank lines are skipped). Three row forms are accepted:

* OpenAI chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``;
* DeepSpec / ShareGPT chat: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``;
* pre-tokenised: ``{"input_ids": [...], "loss_mask": [...]}`` (equal lengths, ``loss_mask`` in {0, 1}).

Roles are normalised (``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``,
``system`` -> ``system``); other keys on a row are ignored. Chat rows are rendered and tokenised with
the target tokenizer's chat template, and ``loss_mask`` is 1 on exactly the tokens of the assistant
contents (see :func:`tokenize_chat`). Every malformed line raises :class:`DatasetError` naming the file
and the 1-based line number.

Examples are batched by :class:`Collator` (right padding), optionally packed several to a row by
:func:`pack_examples`, and ordered by :class:`ResumableSampler` / :func:`iter_batches`, whose order
depends only on ``(seed, epoch)`` so that a run resumed from a :class:`DataPosition` continues exactly.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Sampler

from dspark_core.errors import DSparkError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PAD_DOCUMENT_ID",
    "ChatRow",
    "Collator",
    "DataPosition",
    "DatasetError",
    "DatasetStats",
    "Example",
    "Message",
    "Origin",
    "PackedRow",
    "ResumableSampler",
    "TokenRow",
    "TokenizedDataset",
    "check_mask_token_unused",
    "collate",
    "epoch_order",
    "iter_batches",
    "pack_examples",
    "parse_row",
    "read_jsonl",
    "tokenize_chat",
]

#: ``document_ids`` value of padding positions (real documents are numbered 0, 1, 2, ... per row).
PAD_DOCUMENT_ID = -1

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DatasetError(DSparkError, ValueError):
    """A training data file is missing or malformed, or does not fit the tokenizer or draft config."""


@dataclass(frozen=True)
class Origin:
    """Where a row came from: the file and its 1-based line number."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Message:
    """One chat turn with a normalised role (``system``, ``user`` or ``assistant``)."""

    role: str
    content: str
    #: An assistant turn's tokens as the target produced them (``regenerate`` writes them); when
    #: present they are trained on instead of re-tokenising ``content``.
    response_ids: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, str]:
        """The ``{"role", "content"}`` form chat templates expect."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatRow:
    """A parsed chat row, not yet tokenised."""

    messages: tuple[Message, ...]
    origin: Origin | None = None


@dataclass(frozen=True)
class TokenRow:
    """A parsed pre-tokenised row."""

    input_ids: list[int]
    loss_mask: list[int]
    origin: Origin | None = None


@dataclass(frozen=True)
class Example:
    """One tokenised training example: ``input_ids`` and a 0/1 ``loss_mask`` of the same length."""

    input_ids: list[int]
    loss_mask: list[int]
    origin: Origin | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedRow:
    """Several examples concatenated into one row.

    ``document_ids[t]`` is the index (0, 1, 2, ...) of the document token ``t`` belongs to, and
    ``origins[d]`` is document ``d``'s origin.
    """

    input_ids: list[int]
    loss_mask: list[int]
    document_ids: list[int]
    origins: tuple[Origin | None, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def position_ids(self) -> list[int]:
        """Positions restarting at 0 at each document, as the packed training forward needs."""
        positions: list[int] = []
        previous = None
        pos = 0
        for doc in self.document_ids:
            pos = 0 if doc != previous else pos + 1
            previous = doc
            positions.append(pos)
        return positions


@dataclass
class DatasetStats:
    """Counts gathered while building a :class:`TokenizedDataset`.

    - ``rows_read``: non-blank lines parsed;
    - ``skipped_no_assistant``: chat rows without an assistant turn;
    - ``skipped_no_loss``: rows with no supervised token left (empty assistant contents, an all-zero
      pre-tokenised ``loss_mask``, or supervision that lay entirely beyond ``max_length``);
    - ``truncated``: rows longer than ``max_length`` that were cut (kept or not);
    - ``examples``, ``tokens``, ``loss_tokens``: what was kept.
    """

    rows_read: int = 0
    skipped_no_assistant: int = 0
    skipped_no_loss: int = 0
    truncated: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict, for logs."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading and parsing


def _where(origin: Origin | None) -> str:
    return f"{origin}: " if origin is not None else ""


def _parse_messages(turns: object, key: str, origin: Origin | None) -> tuple[Message, ...]:
    where = _where(origin)
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
        if not isinstance(raw_role, str) or raw_role.lower() not in _ROLE_ALIASES:
            raise DatasetError(
                f"{where}{key}[{i}] has unknown role {raw_role!r}; expected one of {sorted(_ROLE_ALIASES)}"
            )
        if not isinstance(content, str):
            raise DatasetError(
                f"{where}{key}[{i}].{content_key} must be a string, got {type(content).__name__}"
            )
        role = _ROLE_ALIASES[raw_role.lower()]
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
    where = _where(origin)
    if not isinstance(value, list):
        raise DatasetError(f"{where}{key!r} must be a list of integers, got {type(value).__name__}")
    for i, item in enumerate(value):
        # bool is an int subclass; a JSON true/false here is a schema mistake, not a token.
        if isinstance(item, bool) or not isinstance(item, int):
            raise DatasetError(f"{where}{key}[{i}] must be an integer, got {item!r}")
    return list(value)


def parse_row(obj: object, origin: Origin | None = None) -> ChatRow | TokenRow:
    """Validate one decoded JSON row and return it as a :class:`ChatRow` or :class:`TokenRow`."""
    where = _where(origin)
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}a row must be a JSON object, got {type(obj).__name__}")
    forms = [key for key in ("messages", "conversations", "input_ids") if key in obj]
    if len(forms) > 1:
        raise DatasetError(f"{where}a row must have exactly one of {forms}, not several")
    if forms == ["messages"] or forms == ["conversations"]:
        return ChatRow(_parse_messages(obj[forms[0]], forms[0], origin), origin)
    if forms == ["input_ids"]:
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
    raise DatasetError(
        f"{where}unknown row schema with keys {sorted(obj)}: expected 'messages' (OpenAI chat), "
        "'conversations' (DeepSpec chat) or 'input_ids' + 'loss_mask' (pre-tokenised)"
    )


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


# --------------------------------------------------------------------------------------------------
# Tokenisation


def _chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError) as exc:
        raise DatasetError(
            "the tokenizer has no chat template, so chat rows ('messages'/'conversations') cannot be "
            "tokenised: set `tokenizer.chat_template` (or use a tokenizer directory that ships one), or "
            "pre-tokenise the data into {'input_ids': [...], 'loss_mask': [...]} rows"
        ) from exc
    return str(template)


def _assistant_spans_by_prefix(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, str]],
    rendered: str,
    template_kwargs: Mapping[str, Any],
) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in ``rendered``, for templates without generation tags.

    For assistant turn ``i`` the conversation up to ``i`` is rendered with a generation prompt; when
    that is a prefix of the full rendering the content is searched from its end, so a content that
    also appears in an earlier user turn is not mistaken for it.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant" or not message["content"]:
            continue
        start = cursor
        if i > 0:
            prefix = tokenizer.apply_chat_template(
                conversation[:i], tokenize=False, add_generation_prompt=True, **template_kwargs
            )
            if isinstance(prefix, str) and rendered.startswith(prefix):
                start = max(start, len(prefix))
        content = message["content"]
        pos = rendered.find(content, start)
        if pos < 0:
            # Some templates trim the content they render.
            content = content.strip()
            pos = rendered.find(content, start) if content else -1
        if pos < 0:
            raise ValueError(
                f"could not find assistant turn {i}'s content in the rendered chat template; use a "
                "template with {% generation %} markers or pre-tokenise the data"
            )
        spans.append((pos, pos + len(content)))
        cursor = pos + len(content)
    return spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    # Same rule as transformers' assistant mask: a token is supervised iff it overlaps a span.
    mask = [0] * len(offsets)
    span_idx = 0
    for t, (tok_start, tok_end) in enumerate(offsets):
        while span_idx < len(spans) and tok_start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if tok_end > spans[span_idx][0]:
            mask[t] = 1
    return mask


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message | Mapping[str, str]],
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the tokenizer's chat template and tokenise them.

    Returns ``(input_ids, loss_mask)`` where ``loss_mask`` is 1 on exactly the tokens of the assistant
    contents (not role headers or end-of-turn tokens, unless the template puts them inside its
    generation markers). With a fast tokenizer, each assistant content is located in the rendered text
    after the rendering of the turns before it (with a generation prompt), and the tokens overlapping
    those character spans are masked. A slow tokenizer needs ``{% generation %}`` markers in the
    template, and transformers' ``return_assistant_tokens_mask`` gives the mask. Either way a token
    that straddles the edge of an assistant content counts as assistant.

    ``chat_template_kwargs`` are passed to the template (e.g. ``{"enable_thinking": False}`` for Qwen3).
    """
    template = _chat_template(tokenizer)
    template_kwargs = dict(chat_template_kwargs or {})
    if any(isinstance(m, Message) and m.response_ids is not None for m in messages):
        return _tokenize_with_response_ids(tokenizer, messages, template_kwargs)  # type: ignore[arg-type]
    conversation = [m.as_dict() if isinstance(m, Message) else dict(m) for m in messages]
    # Character offsets are preferred even when the template has generation markers: transformers
    # 5.22's return_assistant_tokens_mask drops the last token of a character split across byte-level
    # BPE tokens, and offsets give the same mask on every supported version.
    if not tokenizer.is_fast and _GENERATION_TAG.search(template):
        out: Any = tokenizer.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **template_kwargs,
        )
        return [int(t) for t in out["input_ids"]], [int(m) for m in out["assistant_masks"]]
    if not tokenizer.is_fast:
        raise DatasetError(
            "the chat template has no {% generation %} markers and the tokenizer is not a fast tokenizer, "
            "so assistant tokens cannot be located; use a fast tokenizer, add generation markers to the "
            "template, or pre-tokenise the data"
        )
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, **template_kwargs)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}")
    spans = _assistant_spans_by_prefix(tokenizer, conversation, rendered, template_kwargs)
    enc: Any = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return [int(t) for t in enc["input_ids"]], _mask_from_spans(offsets, spans)


_REPLY_SENTINEL = "\x00dspark-reply-{}\x00"


def _tokenize_with_response_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], template_kwargs: Mapping[str, Any]
) -> tuple[list[int], list[int]]:
    """The chat with each assistant turn's stored ids spliced in verbatim; only those are supervised.

    The template is rendered with a sentinel for each reply and the text between sentinels is
    tokenised piece by piece. The first piece is exactly the prompt the target was given (the
    rendering up to the generation prompt), so the ids follow the context they were generated in.
    """
    conversation = []
    replies: list[tuple[int, ...]] = []
    for m in messages:
        if m.response_ids is not None:
            conversation.append({"role": m.role, "content": _REPLY_SENTINEL.format(len(replies))})
            replies.append(m.response_ids)
        else:
            conversation.append(m.as_dict())
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, **template_kwargs)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}")
    input_ids: list[int] = []
    loss_mask: list[int] = []
    rest = rendered
    for index, reply in enumerate(replies):
        before, found, rest = rest.partition(_REPLY_SENTINEL.format(index))
        if not found:
            raise ValueError("the chat template dropped an assistant turn; pre-tokenise the data instead")
        piece = [int(t) for t in tokenizer(before, add_special_tokens=False)["input_ids"]] if before else []
        input_ids += piece + list(reply)
        loss_mask += [0] * len(piece) + [1] * len(reply)
    tail = [int(t) for t in tokenizer(rest, add_special_tokens=False)["input_ids"]] if rest else []
    return input_ids + tail, loss_mask + [0] * len(tail)


# --------------------------------------------------------------------------------------------------
# Dataset


class TokenizedDataset(Dataset[Example]):
    """A list of :class:`Example` with the :class:`DatasetStats` of how it was built."""

    def __init__(self, examples: Sequence[Example], stats: DatasetStats | None = None) -> None:
        self.examples: list[Example] = list(examples)
        if stats is None:
            stats = DatasetStats(
                rows_read=len(self.examples),
                examples=len(self.examples),
                tokens=sum(len(e) for e in self.examples),
                loss_tokens=sum(sum(e.loss_mask) for e in self.examples),
            )
        self.stats = stats

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[ChatRow | TokenRow],
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_length: int | None = None,
        vocab_size: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> TokenizedDataset:
        """Tokenise chat rows, keep pre-tokenised rows, truncate to ``max_length`` and drop unusable rows.

        ``tokenizer`` is needed only for chat rows (see :func:`tokenize_chat`, which also takes
        ``chat_template_kwargs``). ``vocab_size``, when given (the target config's), rejects token ids
        outside ``[0, vocab_size)``. Truncation keeps the first ``max_length`` tokens.
        """
        if max_length is not None and max_length < 2:
            raise DatasetError(f"max_length must be at least 2, got {max_length}")
        stats = DatasetStats()
        examples: list[Example] = []
        for row in rows:
            stats.rows_read += 1
            where = _where(row.origin)
            if isinstance(row, ChatRow):
                if not any(m.role == "assistant" for m in row.messages):
                    stats.skipped_no_assistant += 1
                    continue
                if tokenizer is None:
                    raise DatasetError(f"{where}chat rows need a tokenizer with a chat template")
                try:
                    input_ids, loss_mask = tokenize_chat(
                        tokenizer, row.messages, chat_template_kwargs=chat_template_kwargs
                    )
                except DatasetError:
                    raise
                except Exception as exc:
                    raise DatasetError(f"{where}could not tokenise the conversation: {exc}") from exc
            else:
                input_ids, loss_mask = row.input_ids, row.loss_mask
            if vocab_size is not None and input_ids and max(input_ids) >= vocab_size:
                raise DatasetError(
                    f"{where}token id {max(input_ids)} is outside the vocabulary ({vocab_size})"
                )
            if max_length is not None and len(input_ids) > max_length:
                stats.truncated += 1
                input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
            if not any(loss_mask):
                stats.skipped_no_loss += 1
                continue
            examples.append(Example(list(input_ids), list(loss_mask), row.origin))
            stats.examples += 1
            stats.tokens += len(input_ids)
            stats.loss_tokens += sum(loss_mask)
        return cls(examples, stats)

    @classmethod
    def from_jsonl(
        cls,
        paths: str | Path | Sequence[str | Path],
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        max_length: int | None = None,
        vocab_size: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> TokenizedDataset:
        """Read one or more JSONL files (in the order given) and build the dataset; see :meth:`from_rows`."""
        path_list = [paths] if isinstance(paths, str | Path) else list(paths)
        missing = [str(p) for p in path_list if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"training data file not found: {', '.join(missing)}")

        def rows() -> Iterator[ChatRow | TokenRow]:
            for path in path_list:
                yield from read_jsonl(path)

        return cls.from_rows(
            rows(),
            tokenizer,
            max_length=max_length,
            vocab_size=vocab_size,
            chat_template_kwargs=chat_template_kwargs,
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def check_mask_token_unused(dataset: Iterable[Example | PackedRow], mask_token_id: int) -> None:
    """Raise :class:`DatasetError` naming the first row where ``mask_token_id`` occurs as a real token.

    The draft feeds ``mask_token_id`` into every block slot it must predict, so the token must never
    appear in the data.
    """
    for i, example in enumerate(dataset):
        if mask_token_id not in example.input_ids:
            continue
        pos = example.input_ids.index(mask_token_id)
        origin = (
            example.origins[example.document_ids[pos]] if isinstance(example, PackedRow) else example.origin
        )
        where = str(origin) if origin is not None else f"example {i}"
        raise DatasetError(
            f"{where}: mask_token_id {mask_token_id} occurs as a real token (position {pos}); the draft's "
            "mask token must never appear in the data: choose an unused (reserved) token for "
            "mask_token_id, or remove it from the data"
        )


# --------------------------------------------------------------------------------------------------
# Packing and batching


def pack_examples(examples: Sequence[Example] | TokenizedDataset, max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens, greedy first-fit in order.

    Each example goes into the first (lowest-numbered) row with room for it, opening a new row when
    none has; documents keep their order inside a row. Rows are not padded here (see :class:`Collator`).
    """
    if max_length < 1:
        raise DatasetError(f"max_length must be positive, got {max_length}")
    for i, example in enumerate(examples):
        if len(example) > max_length:
            where = str(example.origin) if example.origin is not None else f"example {i}"
            raise DatasetError(
                f"{where}: example of {len(example)} tokens does not fit max_length {max_length}; "
                "build the dataset with max_length to truncate it"
            )
    # Leftmost row with enough room, in O(log n): a max-tree over every row's remaining room. Rows not
    # yet opened have full room, so the leftmost fitting row is an open one or the next new one.
    size = 1
    while size < max(len(examples), 1):
        size *= 2
    room = [0] * (2 * size)
    for leaf in range(size, size + len(examples)):
        room[leaf] = max_length
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])

    members: list[list[int]] = []
    for i, example in enumerate(examples):
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= len(example) else 2 * node + 1
        row = node - size
        if row == len(members):
            members.append([])
        members[row].append(i)
        room[node] -= len(example)
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2

    packed: list[PackedRow] = []
    for docs in members:
        input_ids: list[int] = []
        loss_mask: list[int] = []
        document_ids: list[int] = []
        for doc, i in enumerate(docs):
            input_ids.extend(examples[i].input_ids)
            loss_mask.extend(examples[i].loss_mask)
            document_ids.extend([doc] * len(examples[i]))
        packed.append(PackedRow(input_ids, loss_mask, document_ids, tuple(examples[i].origin for i in docs)))
    return packed


@dataclass(frozen=True)
class Collator:
    """Right-pad a batch of :class:`Example` or of :class:`PackedRow` into ``torch.long`` tensors.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``loss_mask`` (padded with 0) and
    ``attention_mask`` (1 on real tokens), all ``[b, S]`` with S the batch's longest row rounded up to
    ``pad_to_multiple_of``. For packed rows it also returns ``document_ids`` (padding gets
    :data:`PAD_DOCUMENT_ID`) and ``position_ids`` (restarting at each document, 0 on padding).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[Example] | Sequence[PackedRow]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        packed = isinstance(batch[0], PackedRow)
        if any(isinstance(item, PackedRow) != packed for item in batch):
            raise TypeError("a batch must be all Example or all PackedRow, not a mix")
        seq_len = max(len(item) for item in batch)
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(batch), seq_len)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        document_ids = torch.full(shape, PAD_DOCUMENT_ID, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        items: Sequence[Example | PackedRow] = batch
        for b, item in enumerate(items):
            n = len(item)
            input_ids[b, :n] = torch.tensor(item.input_ids, dtype=torch.long)
            loss_mask[b, :n] = torch.tensor(item.loss_mask, dtype=torch.long)
            attention_mask[b, :n] = 1
            if isinstance(item, PackedRow):
                document_ids[b, :n] = torch.tensor(item.document_ids, dtype=torch.long)
                position_ids[b, :n] = torch.tensor(item.position_ids, dtype=torch.long)
        out = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
        if packed:
            out["document_ids"] = document_ids
            out["position_ids"] = position_ids
        return out


def collate(
    batch: Sequence[Example] | Sequence[PackedRow],
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Functional form of :class:`Collator`."""
    return Collator(pad_token_id, pad_to_multiple_of)(batch)


# --------------------------------------------------------------------------------------------------
# Deterministic, resumable order


@dataclass(frozen=True, order=True)
class DataPosition:
    """How far training has read: ``index`` examples of epoch ``epoch``'s order already consumed.

    With several ranks, ``index`` counts examples consumed by all ranks together.
    """

    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        for name in ("epoch", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DatasetError(f"DataPosition.{name} must be a non-negative integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        """A JSON-serialisable form, for checkpoints."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> DataPosition:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(epoch=state["epoch"], index=state["index"])
        except KeyError as exc:
            raise DatasetError(f"a data position needs 'epoch' and 'index', got {sorted(state)}") from exc

    def advanced(self, consumed: int) -> DataPosition:
        """The position after ``consumed`` more examples of the same epoch."""
        return DataPosition(self.epoch, self.index + consumed)

    def next_epoch(self) -> DataPosition:
        """The start of the following epoch."""
        return DataPosition(self.epoch + 1, 0)


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of example indices for ``epoch``: a permutation depending only on ``(seed, epoch)``.

    Uses Python's ``random`` with a string seed, whose algorithm is stable across Python and torch
    versions, so an order can be reproduced when resuming on another machine.
    """
    order = list(range(num_examples))
    if shuffle:
        random.Random(f"dspark-data/{seed}/{epoch}").shuffle(order)
    return order


class ResumableSampler(Sampler[int]):
    """Yields this rank's example indices for one epoch, from a :class:`DataPosition` on.

    The global order of an epoch is :func:`epoch_order`. From ``position.index`` on it is cut to a
    multiple of ``num_replicas`` (so every rank gets as many examples) and dealt round-robin: rank r
    gets ``order[index + r], order[index + r + num_replicas], ...``. Iterating does not move the
    position: after consuming ``k`` examples on each rank, call :meth:`position_after` for the
    checkpoint, and :meth:`set_position` (or :meth:`set_epoch`) before the next pass.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        start: DataPosition | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_examples < 0:
            raise ValueError(f"num_examples must be non-negative, got {num_examples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.position = DataPosition()
        self.set_position(start or DataPosition())

    def set_position(self, position: DataPosition) -> None:
        """Continue from ``position`` on the next iteration."""
        if position.index > self.num_examples:
            raise DatasetError(
                f"data position index {position.index} is past the end of an epoch of {self.num_examples} "
                "examples; was the checkpoint made with a different dataset?"
            )
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning on the next iteration."""
        self.set_position(DataPosition(epoch, 0))

    def _usable(self) -> int:
        remaining = self.num_examples - self.position.index
        return remaining - remaining % self.num_replicas

    def __len__(self) -> int:
        return self._usable() // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(
            self.num_examples, seed=self.seed, epoch=self.position.epoch, shuffle=self.shuffle
        )
        start = self.position.index
        yield from order[start + self.rank : start + self._usable() : self.num_replicas]

    def position_after(self, consumed_per_rank: int) -> DataPosition:
        """The global position once every rank has consumed ``consumed_per_rank`` examples of this pass."""
        return self.position.advanced(consumed_per_rank * self.num_replicas)


def iter_batches(
    dataset: Sequence[Example] | Sequence[PackedRow] | TokenizedDataset,
    *,
    batch_size: int,
    seed: int = 0,
    start: DataPosition | None = None,
    collate_fn: Collator | None = None,
    shuffle: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    num_epochs: int | None = None,
) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
    """Yield ``(position_after, batch)`` from ``start`` on, epoch after epoch, without a DataLoader.

    Each epoch drops its last incomplete batch. ``position_after`` is where to resume once the batch
    has been trained on, so saving it with a checkpoint and passing it back as ``start`` continues with
    exactly the next batch. ``num_epochs`` (counted from epoch 0) stops the iteration; ``None`` runs
    forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    collator = collate_fn or Collator()
    sampler = ResumableSampler(
        len(dataset), seed=seed, shuffle=shuffle, start=start, num_replicas=num_replicas, rank=rank
    )
    if len(dataset) < batch_size * num_replicas:
        raise DatasetError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch "
            f"({batch_size} x {num_replicas} ranks)"
        )
    while num_epochs is None or sampler.position.epoch < num_epochs:
        indices = list(sampler)
        for b in range(len(indices) // batch_size):
            chunk = indices[b * batch_size : (b + 1) * batch_size]
            items: list[Any] = [dataset[i] for i in chunk]
            yield sampler.position_after((b + 1) * batch_size), collator(items)
        sampler.set_position(sampler.position.next_epoch())


# -- moved from the trainer (the lead's temporary home until the data package lands) ------------------


def dataset_fingerprint(rows: Sequence[Example] | Sequence[PackedRow]) -> str:
    """A SHA-256 of every row's tokens and mask (and documents), to tell a changed dataset on resume."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row.input_ids).to_bytes(8, "little"))
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in row.input_ids))
        digest.update(bytes(row.loss_mask))
        if isinstance(row, PackedRow):
            digest.update(b"".join(int(d).to_bytes(4, "little", signed=True) for d in row.document_ids))
    return digest.hexdigest()


def resolve_mask_token_id(
    tokenizer: Any,
    vocab_size: int,
    reserved_ids: Sequence[int] = (),
    *,
    mask_token_id: int | None = None,
    mask_token: str | None = None,
) -> int:
    """The draft's ``mask_token_id``: ``mask_token_id``, or ``mask_token`` looked up in the tokenizer, or
    else the first embedding row past the tokenizer's vocabulary or, when there is none, the first
    special token that is not bos/eos/pad/unk and does not occur in the chat template."""
    from dspark_core.errors import DraftConfigError

    if mask_token_id is not None:
        return mask_token_id
    if tokenizer is None:
        raise DraftConfigError("without a tokenizer the mask token cannot be chosen: pass mask_token_id")
    if mask_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(mask_token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id or token_id < 0:
            raise DraftConfigError(f"mask_token {mask_token!r} is not a token of the target's tokenizer")
        return token_id
    if vocab_size > len(tokenizer):
        return len(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    specials = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    )
    excluded = set(reserved_ids) | {i for i in specials if i is not None}
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if (
            added.special
            and token_id not in excluded
            and added.content not in template
            and token_id < vocab_size
        ):
            return int(token_id)
    raise DraftConfigError(
        "cannot choose a mask token automatically: the embedding has no row past the tokenizer and no "
        "unused special token was found; pass mask_token_id (an id the data never uses) or mask_token"
    )


def prompt_turns(messages: Sequence[Any]) -> list[dict[str, str]]:
    """The turns of a chat row before its first assistant turn, as template dicts."""
    out = []
    for message in messages:
        if message.role == "assistant":
            break
        out.append(message.as_dict())
    return out


def encode_prompt(
    tokenizer: Any,
    conversation: Sequence[dict[str, str]],
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """A conversation's prompt ids, with the generation prompt, as the target's chat template renders it."""
    ids: Any = tokenizer.apply_chat_template(
        list(conversation),
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
        **(chat_template_kwargs or {}),
    )
    return [int(t) for t in ids]
