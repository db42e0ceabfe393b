"""The embedded targets' tokenizer: a byte-level BPE with ChatML special tokens and chat template.

Family-agnostic: any family's tiny target uses it. The template marks only the assistant's content
with ``{% generation %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
supervises exactly what the assistant wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Reserved tokens that never occur in text; the first serves as the DSpark ``mask_token_id``.
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(4))
#: Every special token, in id order after the BPE vocabulary (as in Qwen).
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, *RESERVED_TOKENS)
MASK_TOKEN = RESERVED_TOKENS[0]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` entries on ``texts`` and wrap it with the chat parts.

    ``len(tokenizer) == vocab_size + len(SPECIAL_TOKENS)``; ``<|endoftext|>`` is eos and pad.
    Training is deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + 1:
        raise ValueError(f"vocab_size must exceed the {len(byte_alphabet)} byte tokens, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=byte_alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.get_vocab_size() != vocab_size:
        # The text ran out of pairs seen twice; a silently smaller vocabulary would surprise callers.
        raise ValueError(
            f"the training text only supports a BPE vocabulary of {bpe.get_vocab_size()} tokens; "
            f"asked for {vocab_size}"
        )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END, *RESERVED_TOKENS],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
