"""The draft's mask token: which id it is, and that the data never uses it as a real token."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dspark_core.errors import DraftConfigError
from dspark_core.training.data.rows import DatasetError, Example, PackedRow

__all__ = ["check_mask_token_unused", "resolve_mask_token_id"]


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
