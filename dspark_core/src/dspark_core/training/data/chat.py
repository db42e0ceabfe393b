"""Chat-template tokenisation: training rows with their assistant loss mask, and prompts to decode from.

:func:`tokenize_chat` renders a whole conversation for training; :func:`encode_prompt` is the one
prompt encoder, used by evaluation, ``dspark regenerate`` and ``dspark generate`` alike.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dspark_core.training.data.rows import DatasetError, Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["encode_prompt", "prompt_turns", "response_ids_mismatch", "tokenize_chat"]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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


def prompt_turns(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The turns of a chat row before its first assistant turn, as template dicts."""
    out = []
    for message in messages:
        if message.role == "assistant":
            break
        out.append(message.as_dict())
    return out


def encode_prompt(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, str]],
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """A conversation's prompt ids, with the generation prompt, as the target's chat template renders it.

    The template writes its own special tokens, so none are added around it.
    """
    ids: Any = tokenizer.apply_chat_template(
        [dict(m) for m in conversation],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
        **dict(chat_template_kwargs or {}),
    )
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


_REPLY_SENTINEL = "\x00dspark-reply-{}\x00"


def _normalised(text: str) -> str:
    # What decoding is known to change: Unicode normal form, whitespace runs and ends (templates and
    # clean_up_tokenization_spaces), and U+FFFD, which stands for a UTF-8 sequence split by the cut.
    text = unicodedata.normalize("NFKC", text).replace("\ufffd", "")
    return " ".join(text.split())


def response_ids_mismatch(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str | None:
    """Why a chat row's ``response_ids`` are not the tokens of their ``content`` (``None`` when they are).

    The ids are what the draft is trained on, the content what a reader sees: ids from another
    tokenizer (all in range) would otherwise train silently. Decoding the ids (special tokens
    skipped, as ``dspark regenerate`` writes the content) must give the content, up to
    :func:`_normalised`.
    """
    for turn, message in enumerate(messages):
        if message.response_ids is None:
            continue
        decoded = str(tokenizer.decode(list(message.response_ids), skip_special_tokens=True))
        if _normalised(decoded) != _normalised(message.content):
            return (
                f"turn {turn}'s response_ids decode to {_excerpt(decoded)} but its content is "
                f"{_excerpt(message.content)}: the ids are not this tokenizer's tokens of the content "
                "(another tokenizer's?); regenerate the row with this target (dspark regenerate), or "
                "drop response_ids"
            )
    return None


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
