"""The training dataset layer: JSONL parsing, chat tokenisation and loss masks, packing, resumable order."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dspark_core.errors import DraftConfigError, DSparkError
from dspark_core.training.data import (
    PAD_DOCUMENT_ID,
    ROW_FORMATS,
    Collator,
    DataPosition,
    DatasetError,
    Example,
    Message,
    Origin,
    ResumableSampler,
    RowFormat,
    TokenizedDataset,
    TokenRow,
    check_mask_token_unused,
    collate,
    encode_prompt,
    epoch_order,
    iter_batches,
    pack_examples,
    parse_row,
    prompt_turns,
    read_jsonl,
    resolve_mask_token_id,
    tokenize_chat,
)
from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target, make_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "And 3 times 4?\n"},
    {"role": "assistant", "content": " It is 12.\nAnything else? café ☕"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "Goodbye!\n\n"},
]
_DEEPSPEC_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_deepspec(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": _DEEPSPEC_ROLE[m["role"]], "value": m["content"]} for m in messages]


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written verbatim, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def masked_runs(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[list[int]]:
    """The maximal runs of consecutive supervised tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, m in zip(input_ids, loss_mask, strict=True):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(token)
        previous = m
    return runs


def without_generation_markers(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` whose template renders the same text but has no generation markers."""
    template = tokenizer.chat_template
    assert isinstance(template, str)
    stripped = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)
    assert stripped != template
    copy = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = stripped
    return copy


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "target", num_layers=1)


@pytest.fixture(scope="module")
def tokenizer(target_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(target_dir: Path) -> PreTrainedTokenizerBase:
    return without_generation_markers(AutoTokenizer.from_pretrained(target_dir))


def assert_mask_is_assistant_content(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], example: Example
) -> None:
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    runs = [tokenizer.decode(run) for run in masked_runs(example.input_ids, example.loss_mask)]
    assert runs == [m["content"] for m in messages if m["role"] == "assistant" and m["content"]]
    # And the runs sit where the assistant turns are in the rendered text, in order.
    cursor = 0
    for run in runs:
        header = rendered.index("<|im_start|>assistant\n", cursor) + len("<|im_start|>assistant\n")
        assert rendered[header : header + len(run)] == run
        cursor = header + len(run)


# --------------------------------------------------------------------------------------------------
# Loss masks from the chat template


@pytest.mark.parametrize("form", ["openai", "deepspec"])
def test_loss_mask_is_exactly_assistant_content(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, form: str
) -> None:
    row = {"messages": CONVERSATION} if form == "openai" else {"conversations": as_deepspec(CONVERSATION)}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    dataset = TokenizedDataset.from_jsonl(path, tokenizer)
    assert len(dataset) == 1
    example = dataset[0]
    assert example.origin == Origin(str(path), 1)
    assert_mask_is_assistant_content(tokenizer, CONVERSATION, example)


def test_both_forms_and_both_mask_methods_agree(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, plain_tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [{"messages": CONVERSATION}, {"conversations": as_deepspec(CONVERSATION)}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with_markers = TokenizedDataset.from_jsonl(path, tokenizer)
    by_prefix = TokenizedDataset.from_jsonl(path, plain_tokenizer)
    reference = with_markers[0]
    for example in [with_markers[1], by_prefix[0], by_prefix[1]]:
        assert (example.input_ids, example.loss_mask) == (reference.input_ids, reference.loss_mask)


def test_prefix_fallback_is_not_fooled_by_repeated_text(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "yes"},
    ]
    input_ids, loss_mask = tokenize_chat(plain_tokenizer, messages)
    assert_mask_is_assistant_content(plain_tokenizer, messages, Example(input_ids, loss_mask))


# Like Qwen3's own template: no generation markers, an empty think block before the final answer
# unless ``enable_thinking`` is passed, and earlier assistant turns rendered plainly.
QWEN3_LIKE_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' and loop.last and not enable_thinking is defined -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": True}])
def test_prefix_fallback_with_a_qwen3_like_template(target_dir: Path, kwargs: dict[str, Any] | None) -> None:
    tok = AutoTokenizer.from_pretrained(target_dir)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    messages = CONVERSATION[1:]
    input_ids, loss_mask = tokenize_chat(tok, messages, chat_template_kwargs=kwargs)
    rendered = tok.apply_chat_template(messages, tokenize=False, **(kwargs or {}))
    assert tok.decode(input_ids) == rendered
    assert ("<think>" in rendered) == (kwargs is None)
    runs = [tok.decode(run) for run in masked_runs(input_ids, loss_mask)]
    assert runs == [m["content"] for m in messages if m["role"] == "assistant"]


_TEXT = st.text(alphabet="abc xyz,.?!\n0123é☕", min_size=1, max_size=20).filter(lambda s: not s[0].isspace())


@settings(max_examples=25, deadline=None)
@given(
    system=st.none() | _TEXT,
    turns=st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3),
)
def test_loss_mask_property(
    tokenizer: PreTrainedTokenizerBase,
    plain_tokenizer: PreTrainedTokenizerBase,
    system: str | None,
    turns: list[tuple[str, str]],
) -> None:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    for tok in (tokenizer, plain_tokenizer):
        input_ids, loss_mask = tokenize_chat(tok, messages)
        assert_mask_is_assistant_content(tok, messages, Example(input_ids, loss_mask))


def test_no_chat_template_is_a_clear_error(tmp_path: Path, target_dir: Path) -> None:
    bare = AutoTokenizer.from_pretrained(target_dir)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DatasetError, match="no chat template") as info:
        TokenizedDataset.from_jsonl(path, bare)
    assert "pre-tokenise" in str(info.value)
    # Pre-tokenised data needs no template at all.
    ok = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}])
    assert TokenizedDataset.from_jsonl(ok, bare)[0].input_ids == [5, 6, 7]


def test_chat_rows_without_tokenizer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}:1: chat rows need a tokenizer"):
        TokenizedDataset.from_jsonl(path)


# --------------------------------------------------------------------------------------------------
# Reading and validation


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        TokenizedDataset.from_jsonl(missing)
    present = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1, 2], "loss_mask": [1, 1]}])
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        TokenizedDataset.from_jsonl([present, missing])


def test_dataset_error_types() -> None:
    assert issubclass(DatasetError, DSparkError)
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2, 3]", "must be a JSON object"),
        ('{"text": "hello"}', "unknown row schema"),
        ('{"messages": "hi"}', "must be a list"),
        ('{"messages": ["hi"]}', "must be an object"),
        ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "must be a string"),
        ('{"messages": [], "input_ids": [1], "loss_mask": [1]}', "exactly one of"),
        ('{"input_ids": [1, 2]}', "needs 'loss_mask'"),
        ('{"input_ids": [1, "2"], "loss_mask": [1, 1]}', r"input_ids\[1\] must be an integer"),
        ('{"input_ids": [1, true], "loss_mask": [1, 1]}', r"input_ids\[1\] must be an integer"),
        ('{"input_ids": [1, 2.5], "loss_mask": [1, 1]}', r"input_ids\[1\] must be an integer"),
        ('{"input_ids": [1, -2], "loss_mask": [1, 1]}', "negative"),
        ('{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}', "3 entries but 'loss_mask' has 2"),
        ('{"input_ids": [1, 2], "loss_mask": [1, 2]}', "must be 0 or 1"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, bad_line: str, what: str
) -> None:
    good_chat = {"messages": CONVERSATION[:3]}
    good_ids = {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}
    # Line 3 is blank, so the bad row is on line 5 of the file.
    path = write_jsonl(tmp_path / "data.jsonl", [good_chat, good_ids, "", good_chat, bad_line, good_ids])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}:5: .*{what}"):
        TokenizedDataset.from_jsonl(path, tokenizer)


def test_unknown_schema_lists_every_registered_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "id": 3}])
    expected = (
        f"{path}:1: unknown row schema with keys ['id', 'text']: expected 'messages' (OpenAI chat), "
        "'conversations' (DeepSpec chat) or 'input_ids' + 'loss_mask' (pre-tokenised)"
    )
    with pytest.raises(DatasetError) as info:
        list(read_jsonl(path))
    assert str(info.value) == expected


def test_a_new_row_format_is_one_table_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse_ids(obj: Any, origin: Origin | None) -> TokenRow:
        return TokenRow(list(obj["ids"]), [1] * len(obj["ids"]), origin)

    monkeypatch.setitem(ROW_FORMATS, "ids", RowFormat("ids", "'ids' (all supervised)", parse_ids))
    path = write_jsonl(tmp_path / "d.jsonl", [{"ids": [4, 5]}, {"text": "x"}])
    rows = read_jsonl(path)
    assert next(rows) == TokenRow([4, 5], [1, 1], Origin(str(path), 1))
    with pytest.raises(DatasetError, match=r":2: .*\(pre-tokenised\) or 'ids' \(all supervised\)$"):
        next(rows)
    assert parse_row({"messages": []}).messages == ()


def test_encode_prompt_is_the_rendered_template(target_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(target_dir)
    # Qwen3 opens an empty think block after the generation prompt when thinking is off.
    tok.chat_template = QWEN3_LIKE_TEMPLATE + (
        "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking -%}"
        "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    )
    prompt = prompt_turns([Message(m["role"], m["content"]) for m in CONVERSATION])
    assert prompt == CONVERSATION[:2]  # up to the first assistant turn only
    for kwargs in (None, {"enable_thinking": False}):
        rendered = tok.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **(kwargs or {})
        )
        assert isinstance(rendered, str)
        assert rendered.endswith("</think>\n\n" if kwargs else "<|im_start|>assistant\n")
        # The template writes the special tokens itself, so none are added around it.
        expected = tok(rendered, add_special_tokens=False)["input_ids"]
        assert encode_prompt(tok, prompt, chat_template_kwargs=kwargs) == expected


def test_role_normalisation_and_extra_keys(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [
        {"id": "a", "messages": [{"role": "Human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"from": "assistant", "value": "Hello"}]},
    ]
    dataset = TokenizedDataset.from_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    reference = tokenize_chat(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    assert [(e.input_ids, e.loss_mask) for e in dataset] == [reference, reference]


def test_skipped_and_truncated_counts(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    long_question = " ".join(["Why do rivers carry sand and stones to the sea?"] * 8)
    rows: list[Any] = [
        {"messages": CONVERSATION[:3]},  # kept
        {"messages": CONVERSATION[:2]},  # no assistant turn
        "",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Yes."}]},
        {"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]},  # nothing to learn
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"input_ids": list(range(1, 101)), "loss_mask": [1] * 100},  # truncated, kept
    ]
    max_length = 48
    dataset = TokenizedDataset.from_jsonl(
        write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=max_length
    )
    stats = dataset.stats
    assert stats.rows_read == 7
    assert stats.skipped_no_assistant == 1
    # The all-zero row, the empty answer and the answer cut off by truncation.
    assert stats.skipped_no_loss == 3
    assert stats.truncated == 3
    assert stats.examples == len(dataset) == 3
    assert [e.origin.line for e in dataset if e.origin] == [1, 4, 8]
    assert all(len(e) <= max_length for e in dataset)
    assert stats.tokens == sum(len(e) for e in dataset)
    assert stats.loss_tokens == sum(sum(e.loss_mask) for e in dataset)
    # Truncation keeps the beginning of the row.
    assert dataset[2].input_ids == list(range(1, max_length + 1))
    assert json.loads(json.dumps(stats.as_dict()))["truncated"] == 3


def test_vocab_size_check(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"input_ids": [1, 2], "loss_mask": [1, 1]}] * 2 + [{"input_ids": [1, 600], "loss_mask": [1, 1]}],
    )
    with pytest.raises(DatasetError, match=r":3: token id 600 is outside the vocabulary \(519\)"):
        TokenizedDataset.from_jsonl(path, vocab_size=519)
    assert len(TokenizedDataset.from_jsonl(path, vocab_size=601)) == 3


# --------------------------------------------------------------------------------------------------
# The mask token: its choice and collisions with the data


def test_mask_token_resolution() -> None:
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer)
    reserved_0 = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
    # No spare embedding row: the first special token that is not eos/pad and not in the template.
    assert resolve_mask_token_id(tokenizer, vocab) == reserved_0
    assert resolve_mask_token_id(tokenizer, vocab, reserved_ids=[reserved_0]) == reserved_0 + 1
    # A spare embedding row past the tokenizer (Qwen3: 151669) is preferred.
    assert resolve_mask_token_id(tokenizer, vocab + 8) == vocab
    assert resolve_mask_token_id(tokenizer, vocab, mask_token="<|reserved_2|>") == reserved_0 + 2
    assert resolve_mask_token_id(tokenizer, vocab, mask_token_id=7) == 7
    with pytest.raises(DraftConfigError, match="not a token"):
        resolve_mask_token_id(tokenizer, vocab, mask_token="<|nope|>")


def test_mask_token_collision_names_the_row(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    mask_id = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
    rows = [
        {"messages": CONVERSATION},
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
        {"input_ids": [4, mask_id, 5], "loss_mask": [0, 1, 1]},
        {"input_ids": [mask_id], "loss_mask": [1]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset = TokenizedDataset.from_jsonl(path, tokenizer)
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(path))}:3: mask_token_id {mask_id} .*position 1"
    ):
        check_mask_token_unused(dataset, mask_id)
    # In packed rows the error still names the document's own line.
    packed = pack_examples(dataset.examples[1:], max_length=64)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}:3:"):
        check_mask_token_unused(packed, mask_id)
    # Chat text that spells the token out is still a collision: the tokenizer maps it to the special id.
    spelled = [{"role": "user", "content": f"say {TINY_MASK_TOKEN}"}, {"role": "assistant", "content": "no"}]
    spelled_ds = TokenizedDataset.from_jsonl(
        write_jsonl(tmp_path / "s.jsonl", [{"messages": spelled}]), tokenizer
    )
    with pytest.raises(DatasetError, match=":1: mask_token_id"):
        check_mask_token_unused(spelled_ds, mask_id)


def test_mask_token_unused_passes(tokenizer: PreTrainedTokenizerBase) -> None:
    mask_id = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
    input_ids, loss_mask = tokenize_chat(tokenizer, CONVERSATION)
    examples = [Example(input_ids, loss_mask), Example([1, 2, 3], [0, 1, 1])]
    check_mask_token_unused(examples, mask_id)
    check_mask_token_unused(pack_examples(examples, 256), mask_id)
    with pytest.raises(DatasetError, match=r"^example 1: mask_token_id 2 "):
        check_mask_token_unused(examples, 2)


# --------------------------------------------------------------------------------------------------
# Packing and collation


def numbered_examples(lengths: Sequence[int]) -> list[Example]:
    """Examples whose tokens encode (example index, position), so any reshuffle is visible."""
    return [
        Example([1000 * i + t for t in range(n)], [t % 2 for t in range(n)], Origin("mem", i + 1))
        for i, n in enumerate(lengths)
    ]


def test_pack_first_fit_layout() -> None:
    examples = numbered_examples([5, 4, 3, 2, 6, 8])
    rows = pack_examples(examples, max_length=8)
    # 5 -> row 0; 4 -> row 1; 3 -> row 0 (full); 2 -> row 1; 6 -> row 2; 8 -> row 3.
    assert [[o.line for o in r.origins if o] for r in rows] == [[1, 3], [2, 4], [5], [6]]
    assert rows[0].document_ids == [0] * 5 + [1] * 3
    assert rows[1].document_ids == [0] * 4 + [1] * 2
    assert rows[0].input_ids == examples[0].input_ids + examples[2].input_ids
    assert rows[0].loss_mask == examples[0].loss_mask + examples[2].loss_mask
    assert rows[1].position_ids == [0, 1, 2, 3, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=16), min_size=0, max_size=40),
    extra=st.integers(min_value=0, max_value=10),
)
def test_pack_preserves_every_token(lengths: list[int], extra: int) -> None:
    max_length = max(lengths, default=1) + extra
    examples = numbered_examples(lengths)
    rows = pack_examples(examples, max_length)
    seen: list[int] = []
    for row in rows:
        assert 0 < len(row) <= max_length
        assert len(row.loss_mask) == len(row.document_ids) == len(row)
        # Documents are numbered 0..k-1 in order, and each is an example, intact and in order.
        boundaries = [t for t in range(1, len(row)) if row.document_ids[t] != row.document_ids[t - 1]]
        starts = [0, *boundaries]
        assert [row.document_ids[s] for s in starts] == list(range(len(row.origins)))
        for doc, (start, end) in enumerate(zip(starts, [*boundaries, len(row)], strict=True)):
            origin = row.origins[doc]
            assert origin is not None
            source = examples[origin.line - 1]
            assert row.input_ids[start:end] == source.input_ids
            assert row.loss_mask[start:end] == source.loss_mask
            seen.append(origin.line - 1)
    assert sorted(seen) == list(range(len(examples)))
    # First fit opens a new row only when the document fits none of the open ones.
    for r, row in enumerate(rows):
        first = row.origins[0]
        assert first is not None
        earlier_fill = [
            sum(len(examples[o.line - 1]) for o in rows[q].origins if o and o.line < first.line)
            for q in range(r)
        ]
        assert all(fill + len(examples[first.line - 1]) > max_length for fill in earlier_fill)


def test_pack_rejects_too_long() -> None:
    with pytest.raises(DatasetError, match="mem:2: example of 9 tokens does not fit max_length 8"):
        pack_examples(numbered_examples([3, 9]), 8)


def test_collate_examples() -> None:
    batch = collate([Example([5, 6, 7], [0, 1, 1]), Example([8], [1])], pad_token_id=99)
    assert set(batch) == {"input_ids", "loss_mask", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packed_rows() -> None:
    rows = pack_examples(numbered_examples([3, 2, 4]), max_length=5)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["document_ids"].tolist() == [
        [0, 0, 0, 1, 1, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID],
        [0, 0, 0, 0, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum().item() == 9
    assert batch["loss_mask"][batch["attention_mask"] == 0].sum().item() == 0
    with pytest.raises(TypeError, match="mix"):
        collate([rows[0], Example([1], [1])])


# --------------------------------------------------------------------------------------------------
# Deterministic, resumable order


def test_data_position_round_trip() -> None:
    position = DataPosition(epoch=2, index=17)
    assert DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position
    assert position.advanced(3) == DataPosition(2, 20)
    assert position.next_epoch() == DataPosition(3, 0)
    with pytest.raises(DatasetError):
        DataPosition(epoch=-1)
    with pytest.raises(DatasetError, match="needs 'epoch' and 'index'"):
        DataPosition.from_dict({"epoch": 1})


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=1, epoch=0)
    assert a != epoch_order(50, seed=1, epoch=1)
    assert a != epoch_order(50, seed=2, epoch=0)
    assert epoch_order(5, seed=1, epoch=0, shuffle=False) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_sampler_resumes_with_the_tail(num_replicas: int) -> None:
    n = 23
    full = [list(ResumableSampler(n, seed=7, num_replicas=num_replicas, rank=r)) for r in range(num_replicas)]
    # The ranks share out the epoch's order, cut to a multiple of the number of ranks.
    dealt = [full[r][i] for i in range(len(full[0])) for r in range(num_replicas)]
    assert dealt == epoch_order(n, seed=7, epoch=0)[: n - n % num_replicas]
    for k in range(len(full[0]) + 1):
        for r in range(num_replicas):
            sampler = ResumableSampler(n, seed=7, num_replicas=num_replicas, rank=r)
            resumed = ResumableSampler(
                n, seed=7, num_replicas=num_replicas, rank=r, start=sampler.position_after(k)
            )
            assert list(resumed) == full[r][k:]
            assert len(resumed) == len(full[r]) - k


def test_sampler_rejects_position_past_the_end() -> None:
    with pytest.raises(DatasetError, match="different dataset"):
        ResumableSampler(10, start=DataPosition(0, 11))


def test_iter_batches_resumed_at_k_yields_the_tail() -> None:
    dataset = numbered_examples([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    kwargs: dict[str, Any] = {
        "batch_size": 3,
        "seed": 11,
        "num_epochs": 3,
        "collate_fn": Collator(pad_token_id=0),
    }
    full = list(iter_batches(dataset, **kwargs))
    assert len(full) == 3 * (len(dataset) // 3)
    # Each epoch sees different examples in its batches (a fresh permutation), dropping the remainder.
    epochs = [
        [int(b["input_ids"][i, 0]) // 1000 for _, b in full[e * 3 : e * 3 + 3] for i in range(3)]
        for e in range(3)
    ]
    assert all(len(set(ids)) == 9 for ids in epochs)
    assert epochs[0] != epochs[1]
    for k in range(len(full)):
        resumed = list(iter_batches(dataset, start=full[k - 1][0] if k else None, **kwargs))
        assert len(resumed) == len(full) - k
        for (pos_a, a), (pos_b, b) in zip(resumed, full[k:], strict=True):
            assert pos_a == pos_b
            assert all(torch.equal(a[key], b[key]) for key in b)


def test_sampler_in_a_dataloader() -> None:
    dataset = TokenizedDataset(numbered_examples([2, 3, 4, 5, 6]))
    sampler = ResumableSampler(len(dataset), seed=0, start=DataPosition(0, 2))
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=Collator())
    batches = list(loader)
    order = epoch_order(len(dataset), seed=0, epoch=0)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    firsts = [int(b["input_ids"][i, 0]) // 1000 for b in batches for i in range(b["input_ids"].shape[0])]
    assert firsts == order[2:]
    assert sampler.position_after(2) == DataPosition(0, 4)
