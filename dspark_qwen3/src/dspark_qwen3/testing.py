"""Tiny local Qwen3 and Qwen3-MoE targets, built in process: the plugin's side of the embedded targets.

Core's ``dspark make-tiny-target --family qwen3|qwen3-moe`` reaches :func:`build_tiny_qwen3` and
:func:`build_tiny_qwen3_moe` through the ``dspark_tiny_target_builders`` hook. Tests use
:func:`make_tiny_target`: the random target with core's BPE tokenizer and ChatML template, saved with
``save_pretrained``. Both are deterministic given the seed.

Example::

    from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target

    path = make_tiny_target("tiny-target")
    tokenizer = AutoTokenizer.from_pretrained(path)
    mask_token_id = tokenizer.convert_tokens_to_ids(TINY_MASK_TOKEN)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark_core.targets.builders import TinyTargetShape
from dspark_core.targets.tiny_text import tiny_corpus
from dspark_core.targets.tokenizer import CHAT_TEMPLATE, MASK_TOKEN, SPECIAL_TOKENS, train_chat_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_MASK_TOKEN",
    "TINY_SPECIAL_TOKENS",
    "build_tiny_qwen3",
    "build_tiny_qwen3_moe",
    "make_tiny_target",
    "make_tiny_tokenizer",
    "tiny_corpus",
    "tiny_target_config",
]

TINY_SPECIAL_TOKENS = SPECIAL_TOKENS
TINY_MASK_TOKEN = MASK_TOKEN
TINY_CHAT_TEMPLATE = CHAT_TEMPLATE


def make_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Core's chat BPE trained on the built-in tiny text (``vocab_size`` entries before specials)."""
    try:
        return train_chat_tokenizer(tiny_corpus(), vocab_size)
    except ValueError as exc:
        raise ValueError(str(exc).replace("the training text", "the built-in corpus")) from exc


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
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
) -> Qwen3Config | Qwen3MoeConfig:
    """The tiny target's ``Qwen3Config`` (or ``Qwen3MoeConfig`` with four tiny experts, two active).

    ``vocab_size`` is the full embedding size, i.e. ``len(tokenizer)`` including special tokens.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    shape = TinyTargetShape(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": shape.ffn_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": max_position_embeddings,
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


def _build(shape: TinyTargetShape, *, moe: bool) -> PreTrainedModel:
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    config = tiny_target_config(
        vocab_size=shape.vocab_size,
        bos_token_id=shape.bos_token_id,
        eos_token_id=shape.eos_token_id,
        pad_token_id=shape.pad_token_id,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        moe=moe,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
    )
    return Qwen3MoeForCausalLM(config) if moe else Qwen3ForCausalLM(config)  # type: ignore[arg-type]


def build_tiny_qwen3(shape: TinyTargetShape) -> PreTrainedModel:
    """A randomly initialised dense ``Qwen3ForCausalLM`` of ``shape`` (the caller seeds torch)."""
    return _build(shape, moe=False)


def build_tiny_qwen3_moe(shape: TinyTargetShape) -> PreTrainedModel:
    """A randomly initialised ``Qwen3MoeForCausalLM`` of ``shape``: four tiny experts, two active."""
    return _build(shape, moe=True)


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
    """Build the random tiny target and its tokenizer and save both (safetensors) into ``output_dir``.

    ``vocab_size`` is the size of the trained BPE; the model's vocabulary is ``len(tokenizer)``, which
    adds the special tokens. The weights depend only on ``seed`` (the global RNG is left untouched).
    ``logit_scale`` multiplies the output head: a random model's next-token distributions are nearly
    uniform, and a scale around 30 makes them peaked like a trained model's, so a draft trained on it
    has something to learn. Returns ``output_dir`` as a ``Path``.
    """
    from dspark_core.targets.build import save_random_target

    return save_random_target(
        output_dir,
        tokenizer=make_tiny_tokenizer(vocab_size),
        builder=build_tiny_qwen3_moe if moe else build_tiny_qwen3,
        shape_overrides={
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
        },
        seed=seed,
        logit_scale=logit_scale,
    )
