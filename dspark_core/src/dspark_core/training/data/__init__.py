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

One job per module: ``rows`` (the types and :class:`DatasetError`), ``formats`` (JSONL and the row
formats' dispatch table), ``chat`` (chat-template tokenisation and the prompt encoder), ``dataset``
(:class:`TokenizedDataset`), ``mask_token``, ``fingerprint``, ``packing``, ``collate`` and ``order``.
"""

from __future__ import annotations

from dspark_core.training.data.chat import encode_prompt, prompt_turns, tokenize_chat
from dspark_core.training.data.collate import Collator, collate
from dspark_core.training.data.dataset import DatasetStats, TokenizedDataset
from dspark_core.training.data.fingerprint import dataset_fingerprint
from dspark_core.training.data.formats import ROW_FORMATS, RowFormat, parse_row, read_jsonl
from dspark_core.training.data.mask_token import check_mask_token_unused, resolve_mask_token_id
from dspark_core.training.data.order import DataPosition, ResumableSampler, epoch_order, iter_batches
from dspark_core.training.data.packing import pack_examples
from dspark_core.training.data.rows import (
    PAD_DOCUMENT_ID,
    ChatRow,
    DatasetError,
    Example,
    Message,
    Origin,
    PackedRow,
    TokenRow,
)

__all__ = [
    "PAD_DOCUMENT_ID",
    "ROW_FORMATS",
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
    "RowFormat",
    "TokenRow",
    "TokenizedDataset",
    "check_mask_token_unused",
    "collate",
    "dataset_fingerprint",
    "encode_prompt",
    "epoch_order",
    "iter_batches",
    "pack_examples",
    "parse_row",
    "prompt_turns",
    "read_jsonl",
    "resolve_mask_token_id",
    "tokenize_chat",
]
