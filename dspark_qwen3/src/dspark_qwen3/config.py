"""Draft configs for Qwen3 and Qwen3-MoE targets.

A draft is a dense Qwen3 whatever the target: an MoE target's attention and embedding shapes are
kept, its experts are not. ``model_type`` stays ``qwen3`` and ``architectures`` is
``["Qwen3DSparkModel"]``, which is how vLLM and SGLang recognise a DSpark draft.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3Config

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.draft_config import DSparkDraftOptions, apply_dspark_fields

SUPPORTED_TARGET_TYPES = ("qwen3", "qwen3_moe")

# Everything the backbone needs, copied unchanged from the target.
_BACKBONE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def build_draft_config(target_config: PretrainedConfig, **options: Any) -> Qwen3Config:
    """The draft config for a Qwen3 or Qwen3-MoE target.

    Options (see :class:`dspark_core.modeling.draft_config.DSparkDraftOptions`): ``num_draft_layers``,
    ``block_size``, ``target_layer_ids`` (default: ``build_target_layer_ids(n, num_draft_layers)``),
    ``num_feature_layers``, ``mask_token_id`` (required), ``num_anchors``, ``markov_rank``,
    ``markov_head_type``, ``enable_confidence_head``, ``confidence_head_with_markov``.
    """
    model_type = getattr(target_config, "model_type", None)
    if model_type not in SUPPORTED_TARGET_TYPES:
        raise DraftConfigError(
            "dspark-qwen3 builds drafts for Qwen3 targets (model_type "
            f"{' or '.join(SUPPORTED_TARGET_TYPES)}), but this target config has model_type "
            f"{model_type!r}; install the dspark plugin for that family"
        )
    try:
        draft_options = DSparkDraftOptions(**options)
    except TypeError as exc:
        known = ", ".join(DSparkDraftOptions.__dataclass_fields__)
        raise DraftConfigError(f"{exc}; the draft options are: {known}") from None
    fields = {name: getattr(target_config, name) for name in _BACKBONE_FIELDS if hasattr(target_config, name)}
    if model_type == "qwen3_moe" and getattr(target_config, "intermediate_size", None) is None:
        fields["intermediate_size"] = target_config.moe_intermediate_size
    config = Qwen3Config(**fields)
    config.architectures = ["Qwen3DSparkModel"]
    apply_dspark_fields(config, draft_options, num_target_layers=int(target_config.num_hidden_layers))
    return config
