"""The tokenised training set: rows read, chat rows tokenised, truncated and filtered, with counts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from dspark_core.training.data.chat import response_ids_mismatch, tokenize_chat
from dspark_core.training.data.formats import read_jsonl
from dspark_core.training.data.rows import ChatRow, DatasetError, Example, TokenRow, where_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DatasetStats", "TokenizedDataset"]


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
            where = where_prefix(row.origin)
            if isinstance(row, ChatRow):
                if not any(m.role == "assistant" for m in row.messages):
                    stats.skipped_no_assistant += 1
                    continue
                if tokenizer is None:
                    raise DatasetError(f"{where}chat rows need a tokenizer with a chat template")
                mismatch = response_ids_mismatch(tokenizer, row.messages)
                if mismatch is not None:
                    raise DatasetError(f"{where}{mismatch}")
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
