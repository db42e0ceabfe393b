"""A tiny local Gemma 4 target, built in process: the plugin's side of the embedded targets.

Core's ``dspark make-tiny-target --family gemma4`` reaches :func:`build_tiny_gemma4` through the
``dspark_tiny_target_builders`` hook. The target is a ``Gemma4ForConditionalGeneration`` (model_type
``gemma4`` with a ``text_config``, no vision or audio tower) whose text stack alternates sliding and
full attention with a short window, so decoding runs past the window within a few dozen tokens. Its
full-attention layers have Gemma 4's own shape (``global_head_dim``, ``attention_k_eq_v`` with
``num_global_key_value_heads``, proportional rope) and its logits are soft-capped.

Example::

    from dspark_gemma4.testing import make_tiny_target

    path = make_tiny_target("tiny-gemma4")   # random weights, core's chat tokenizer
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark_core.targets.builders import TinyTargetShape
from dspark_core.targets.tiny_text import tiny_corpus
from dspark_core.targets.tokenizer import MASK_TOKEN, train_chat_tokenizer

if TYPE_CHECKING:
    from transformers import Gemma4Config, PreTrainedModel

__all__ = [
    "TINY_MASK_TOKEN",
    "TINY_SLIDING_WINDOW",
    "build_tiny_gemma4",
    "make_tiny_target",
    "tiny_layer_types",
    "tiny_target_config",
]

TINY_MASK_TOKEN = MASK_TOKEN
#: Short enough that a test prompt plus a few dozen new tokens runs past it.
TINY_SLIDING_WINDOW = 16
#: Gemma 4 12B's soft cap on the output logits.
TINY_LOGIT_SOFTCAP = 30.0


def tiny_layer_types(num_layers: int) -> list[str]:
    """Sliding and full attention alternating, the last layer full (as Gemma 4 requires)."""
    return ["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers - 1)] + [
        "full_attention"
    ]


def tiny_target_config(shape: TinyTargetShape, *, sliding_window: int = TINY_SLIDING_WINDOW) -> Gemma4Config:
    """The tiny target's ``Gemma4Config``: a text config of ``shape``, no vision or audio tower."""
    from transformers import Gemma4Config, Gemma4TextConfig

    head_dim = shape.hidden_size // shape.num_heads
    text: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": head_dim,
        "global_head_dim": 2 * head_dim,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": tiny_layer_types(shape.num_layers),
        "sliding_window": sliding_window,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": shape.vocab_size,
        "final_logit_softcapping": TINY_LOGIT_SOFTCAP,
        "tie_word_embeddings": False,
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": shape.eos_token_id,
        # Gemma4Model.forward writes pad_token_id over multimodal positions, so it must be set; 0 is
        # Gemma's own default.
        "pad_token_id": 0 if shape.pad_token_id is None else shape.pad_token_id,
    }
    return Gemma4Config(
        text_config=Gemma4TextConfig(**text),
        vision_config=None,
        audio_config=None,
        tie_word_embeddings=False,
        architectures=["Gemma4ForConditionalGeneration"],
    )


def build_tiny_gemma4(shape: TinyTargetShape) -> PreTrainedModel:
    """A randomly initialised ``Gemma4ForConditionalGeneration`` of ``shape`` (the caller seeds torch)."""
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration(tiny_target_config(shape))


def make_tiny_target(
    output_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    logit_scale: float = 1.0,
) -> Path:
    """Build the random tiny Gemma 4 target and core's chat tokenizer and save both into ``output_dir``.

    The weights depend only on ``seed``; ``logit_scale`` sharpens the output head (see
    ``dspark_core.targets.build.save_random_target``). Returns ``output_dir`` as a ``Path``.
    """
    from dspark_core.targets.build import save_random_target

    return save_random_target(
        output_dir,
        tokenizer=train_chat_tokenizer(tiny_corpus(), vocab_size),
        builder=build_tiny_gemma4,
        shape_overrides={
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
        },
        seed=seed,
        logit_scale=logit_scale,
    )
