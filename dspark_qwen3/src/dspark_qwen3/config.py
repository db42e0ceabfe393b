"""Draft configs for Qwen3 and Qwen3-MoE targets: a declaration of core's standard backbone.

A draft is a dense Qwen3 whatever the target: an MoE target's attention and embedding shapes are
kept, its experts are not. ``model_type`` stays ``qwen3`` and ``architectures`` is
``["Qwen3DSparkModel"]``, which is how vLLM and SGLang recognise a DSpark draft.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3Config

from dspark_core.modeling.draft_config import DraftFamily

SUPPORTED_TARGET_TYPES = ("qwen3", "qwen3_moe")

QWEN3_FAMILY = DraftFamily(
    distribution="dspark-qwen3",
    config_class=Qwen3Config,
    target_model_types=SUPPORTED_TARGET_TYPES,
    architecture="Qwen3DSparkModel",
    # An MoE target gives its dense draft the experts' width when it has no dense intermediate size.
    fallbacks={"intermediate_size": "moe_intermediate_size"},
)


def build_draft_config(target_config: PretrainedConfig, **options: Any) -> Qwen3Config:
    """The draft config for a Qwen3 or Qwen3-MoE target.

    Options (see :class:`dspark_core.modeling.draft_config.DSparkDraftOptions`): ``num_draft_layers``,
    ``block_size``, ``target_layer_ids`` (default: ``build_target_layer_ids(n, num_draft_layers)``),
    ``num_feature_layers``, ``mask_token_id`` (required), ``num_anchors``, ``markov_rank``,
    ``markov_head_type``, ``enable_confidence_head``, ``confidence_head_with_markov``.
    """
    config: Qwen3Config = QWEN3_FAMILY.build_config(target_config, **options)
    return config
