"""The row and example types every part of the data package shares, and its error."""

from __future__ import annotations

from dataclasses import dataclass

from dspark_core.errors import DSparkError

__all__ = [
    "PAD_DOCUMENT_ID",
    "ChatRow",
    "DatasetError",
    "Example",
    "Message",
    "Origin",
    "PackedRow",
    "TokenRow",
]

#: ``document_ids`` value of padding positions (real documents are numbered 0, 1, 2, ... per row).
PAD_DOCUMENT_ID = -1


class DatasetError(DSparkError, ValueError):
    """A training data file is missing or malformed, or does not fit the tokenizer or draft config."""


@dataclass(frozen=True)
class Origin:
    """Where a row came from: the file and its 1-based line number."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def where_prefix(origin: Origin | None) -> str:
    """``"file:line: "`` to start an error message with, or ``""`` for a row of unknown origin."""
    return f"{origin}: " if origin is not None else ""


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
