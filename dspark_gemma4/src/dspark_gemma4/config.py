"""Draft configs for Gemma 4 targets, in the layout of DeepSpec's published Gemma 4 DSpark draft.

As DeepSpec's ``deepspec/modeling/dspark/gemma4/config.py`` does, the draft config is a copy of the
target's *text* config (read from a multimodal target's ``text_config``), so every Gemma field is
copied deliberately, not left to the class's defaults; then ``num_hidden_layers`` and ``layer_types``
(all ``full_attention``: the draft layers attend to the whole context) and the DSpark fields are
written, with ``architectures = ["Gemma4DSparkModel"]``, ``target_model_type`` and
``target_text_model_type``. ``model_type`` stays the text config's (``gemma4_text`` or
``gemma4_unified_text``).

transformers >= 5.22 holds Gemma 4's full-attention head size and key/value heads as
``per_layer_config`` overrides; the published ``config.json`` (written under transformers 5.10)
names them ``global_head_dim`` and ``num_global_key_value_heads``. The draft configs here save that
form, which both generations of transformers read back to the same per-layer shapes.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import Gemma4TextConfig, PretrainedConfig
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

from dspark_core.errors import DraftConfigError
from dspark_core.model_dirs import text_config_of
from dspark_core.modeling.draft_config import apply_dspark_fields, parse_draft_options

__all__ = [
    "ARCHITECTURE",
    "Gemma4DSparkTextConfig",
    "Gemma4UnifiedDSparkTextConfig",
    "build_draft_config",
    "draft_config_class",
    "global_attention_shape",
]

ARCHITECTURE = "Gemma4DSparkModel"
#: top-level model_type -> the model_type of its text config
TARGET_MODEL_TYPES = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
FULL_ATTENTION = "full_attention"


class _PublishedLayout:
    """Saves ``global_head_dim``/``num_global_key_value_heads`` in place of ``per_layer_config``."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()  # type: ignore[misc]
        _publish(self, out)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_diff_dict()  # type: ignore[misc]
        _publish(self, out)
        return out


def _publish(config: Any, out: dict[str, Any]) -> None:
    out.pop("per_layer_config", None)
    head_dim, kv_heads = global_attention_shape(config)
    out["global_head_dim"] = head_dim
    out["num_global_key_value_heads"] = kv_heads if bool(getattr(config, "attention_k_eq_v", False)) else None


class Gemma4DSparkTextConfig(_PublishedLayout, Gemma4TextConfig):
    """``Gemma4TextConfig`` of a draft (``model_type`` ``gemma4_text``), saved in the published form."""


class Gemma4UnifiedDSparkTextConfig(_PublishedLayout, Gemma4UnifiedTextConfig):
    """``Gemma4UnifiedTextConfig`` of a draft (``model_type`` ``gemma4_unified_text``)."""


DRAFT_CONFIG_CLASSES: dict[str, type[Any]] = {
    "gemma4_text": Gemma4DSparkTextConfig,
    "gemma4_unified_text": Gemma4UnifiedDSparkTextConfig,
}


def draft_config_class(model_type: str) -> type[Any]:
    """The draft config class for a text ``model_type``."""
    try:
        return DRAFT_CONFIG_CLASSES[model_type]
    except KeyError:
        raise DraftConfigError(
            f"a Gemma 4 DSpark draft has model_type {' or '.join(DRAFT_CONFIG_CLASSES)}, got {model_type!r}"
        ) from None


def global_attention_shape(config: Any) -> tuple[int, int]:
    """``(head_dim, num_key_value_heads)`` of the config's full-attention layers (Gemma 4's
    ``global_head_dim`` and, with ``attention_k_eq_v``, ``num_global_key_value_heads``)."""
    full = config.per_layer_config[FULL_ATTENTION]
    return int(full.head_dim), int(full.num_key_value_heads)


def _target_text_config(target_config: Any) -> tuple[Any, str]:
    """The target's text config and its top-level ``model_type``; refuses other families."""
    top_type = getattr(target_config, "model_type", None)
    text = text_config_of(target_config)
    text_type = getattr(text, "model_type", None)
    accepted = top_type in TARGET_MODEL_TYPES or top_type in DRAFT_CONFIG_CLASSES
    if not accepted or text_type not in DRAFT_CONFIG_CLASSES:
        raise DraftConfigError(
            f"dspark-gemma4 builds drafts for targets of model_type {', '.join(TARGET_MODEL_TYPES)} (or "
            f"their text stacks {', '.join(DRAFT_CONFIG_CLASSES)}), but this target config has model_type "
            f"{top_type!r} (text {text_type!r}); install the dspark plugin for that family"
        )
    return text, str(top_type)


def _check_supported(text: Any) -> None:
    """The draft layer is dense, without per-layer inputs or KV sharing (as DeepSpec's)."""
    unsupported = {
        "enable_moe_block": bool(getattr(text, "enable_moe_block", False)),
        "hidden_size_per_layer_input": int(getattr(text, "hidden_size_per_layer_input", 0) or 0) != 0,
        "use_double_wide_mlp with num_kv_shared_layers": bool(getattr(text, "use_double_wide_mlp", False))
        and int(getattr(text, "num_kv_shared_layers", 0) or 0) > 0,
    }
    bad = [name for name, flagged in unsupported.items() if flagged]
    if bad:
        raise DraftConfigError(
            f"the Gemma 4 DSpark draft layer supports dense targets only; this target's text config sets "
            f"{', '.join(bad)} (a MoE or per-layer-input Gemma 4), which DeepSpec's draft does not support"
        )


def build_draft_config(target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
    """The draft config for a Gemma 4 target config (top-level or text).

    Options (see :class:`dspark_core.modeling.draft_config.DSparkDraftOptions`): ``num_draft_layers``,
    ``block_size``, ``target_layer_ids``, ``num_feature_layers``, ``mask_token_id`` (required),
    ``num_anchors``, ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``,
    ``confidence_head_with_markov``.
    """
    text, top_type = _target_text_config(target_config)
    _check_supported(text)
    draft_options = parse_draft_options(options)
    head_dim, kv_heads = global_attention_shape(text)
    num_draft_layers = int(draft_options.num_draft_layers)
    fields = copy.deepcopy(text.to_dict())
    for name in ("per_layer_config", "model_type", "transformers_version", "architectures"):
        fields.pop(name, None)
    fields["num_hidden_layers"] = num_draft_layers
    fields["layer_types"] = [FULL_ATTENTION] * num_draft_layers
    fields["global_head_dim"] = head_dim
    fields["num_global_key_value_heads"] = kv_heads if bool(fields.get("attention_k_eq_v")) else None
    config: PretrainedConfig = draft_config_class(text.model_type)(**fields)
    config.architectures = [ARCHITECTURE]
    config.target_model_type = top_type
    config.target_text_model_type = str(text.model_type)
    apply_dspark_fields(config, draft_options, num_target_layers=int(text.num_hidden_layers))
    return config
