"""A tiny local Qwen3 (or Qwen3-MoE) target and tokenizer, built in process.

This is the "embedded default" target of the tests, examples, benchmarks and README: no model hub is
needed. :func:`make_tiny_target` trains a small byte-level BPE on a built-in English corpus, gives it
ChatML special tokens and a ChatML chat template with ``{% generation %}`` markers (so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works), builds a randomly initialised
``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` over that vocabulary and saves both with
``save_pretrained``. The result is deterministic given the seed.

Example::

    from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target

    path = make_tiny_target("tiny-target")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mask_token_id = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_MASK_TOKEN",
    "TINY_SPECIAL_TOKENS",
    "make_tiny_target",
    "make_tiny_tokenizer",
    "tiny_corpus",
    "tiny_target_config",
]

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Reserved tokens that never occur in text; one of them serves as the DSpark ``mask_token_id``.
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(4))
#: Every special token, in id order after the BPE vocabulary.
TINY_SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, *RESERVED_TOKENS)
#: The reserved token to use as the draft's ``mask_token_id`` (never pad or eos, never in text).
TINY_MASK_TOKEN = RESERVED_TOKENS[0]

#: Qwen-style ChatML. Only the assistant *content* sits inside ``{% generation %}``, so the assistant
#: token mask covers exactly what the assistant wrote (not the role header, not ``<|im_end|>``).
TINY_CHAT_TEMPLATE = (
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

# Hand-written training text for the BPE: varied everyday English, some code-ish and Q&A lines.
# It only has to be big enough for a few hundred merges; the numeric lines below add digits.
_CORPUS_TEXT = """\
The morning was cold, so Maya put on her green coat before walking to the station.
A small dog waited by the bakery door, hoping someone would drop a piece of bread.
Rivers carry sand and stones from the mountains down to the sea over many years.
When the library opened, the children ran straight to the shelf with picture books.
Please remember to water the tomatoes on Tuesday and Friday while I am away.
The committee will meet again next week to discuss the budget for the new bridge.
Our team finished the project early because everyone shared the work fairly.
She wrote a letter to her grandfather and told him about the school play.
Bright stars filled the sky after the storm had moved far to the east.
He could not find his keys, so he checked every pocket twice and then the kitchen.
Question: What is the capital of France?
Answer: The capital of France is Paris.
Question: How many days are there in a week?
Answer: There are seven days in a week.
Question: Why do leaves change colour in autumn?
Answer: Trees stop making green chlorophyll, so yellow and red pigments show through.
Question: Can you give me a short tip for learning a new language?
Answer: Practise a little every day, and read simple stories out loud.
User: Could you summarise this paragraph in one sentence?
Assistant: Sure. The paragraph says that regular exercise improves sleep and mood.
User: Thanks! What should I cook for dinner tonight?
Assistant: A vegetable stir fry with rice is quick, healthy and easy to make.
def add(a, b):
    return a + b

for item in items:
    if item.is_ready():
        print("ready:", item.name)

The recipe needs two cups of flour, one egg, a pinch of salt and some warm milk.
Mix the dry ingredients first, then add the milk slowly while stirring.
Train number 42 leaves at 9:15 and arrives in the city at 11:40.
The museum is closed on Mondays, but the garden stays open until sunset.
If it rains tomorrow, we will play board games inside instead of going hiking.
Good software is tested, documented and kept simple enough for others to change.
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
Learning to ride a bicycle takes patience, balance and a few scraped knees.
A teacher asked the class to explain why the moon seems to change its shape.
The answer is that we see different parts of its sunlit side as it orbits the Earth.
Coffee, tea or water? I would like a glass of water, please.
The system prompt tells the assistant how to answer the user, and the user asks the questions.
It was the best meal they had eaten in months, and they talked late into the night.
"""

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _numeric_lines() -> Iterator[str]:
    """Simple arithmetic and counting lines, so that digits and number words get merges too."""
    for a in range(1, 13):
        b = (a * 7) % 11 + 1
        yield f"Question: What is {a} plus {b}? Answer: {a} plus {b} is {a + b}."
        yield f"Question: What is {a} times {b}? Answer: {a} times {b} is {a * b}."
    for i, word in enumerate(_NUMBER_WORDS):
        yield f"The word for {i} is {word}, and {word} comes before {i + 1}."
    yield "Counting: " + ", ".join(str(i) for i in range(0, 120, 3)) + "."


def tiny_corpus() -> list[str]:
    """The built-in training text of the tiny tokenizer, one line per entry."""
    return [*_CORPUS_TEXT.splitlines(), *_numeric_lines()]


def make_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (``vocab_size`` entries before the special tokens) and wrap it.

    The special tokens (:data:`TINY_SPECIAL_TOKENS`) come after the BPE vocabulary, as in Qwen, so
    ``len(tokenizer) == vocab_size + len(TINY_SPECIAL_TOKENS)``. ``<|endoftext|>`` is eos and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + 1:
        raise ValueError(f"vocab_size must exceed the {len(byte_alphabet)} byte tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        # The corpus ran out of pairs seen twice; a silently smaller vocab would surprise callers.
        raise ValueError(
            f"the built-in corpus only supports a BPE vocabulary of {tok.get_vocab_size()} tokens; "
            f"asked for {vocab_size}"
        )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END, *RESERVED_TOKENS],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_target_config(
    *,
    vocab_size: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    moe: bool = False,
) -> Qwen3Config | Qwen3MoeConfig:
    """The tiny target's ``Qwen3Config`` (or ``Qwen3MoeConfig`` with four tiny experts, two active).

    ``vocab_size`` is the full embedding size, i.e. ``len(tokenizer)`` including special tokens.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"which must divide by num_kv_heads ({num_kv_heads})"
        )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
    }
    if moe:
        return Qwen3MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden_size // 2,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
    return Qwen3Config(**common)


def make_tiny_target(
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    moe: bool = False,
    logit_scale: float = 1.0,
) -> Path:
    """Build the tiny target and its tokenizer and save both (safetensors) into ``output_dir``.

    ``vocab_size`` is the size of the trained BPE; the model's vocabulary is ``len(tokenizer)``, which
    adds the special tokens. The weights depend only on ``seed`` (the global RNG is left untouched).
    ``logit_scale`` multiplies the output head: a random model's next-token distributions are nearly
    uniform, and a scale around 30 makes them peaked like a trained model's, so a draft trained on it
    has something to learn. Returns ``output_dir`` as a ``Path``.
    """
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    out = Path(output_dir)
    tokenizer = make_tiny_tokenizer(vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert isinstance(eos_id, int)
    config = tiny_target_config(
        vocab_size=len(tokenizer),
        # Qwen3 has no BOS token in text; its config names <|endoftext|> as bos, so do the same.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        moe=moe,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config) if moe else Qwen3ForCausalLM(config)  # type: ignore[arg-type]
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
