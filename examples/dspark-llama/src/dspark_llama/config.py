"""What a Llama draft config copies from its target: the standard fields, plus Llama's MLP bias flag."""

from transformers import LlamaConfig

from dspark_core.modeling.draft_config import STANDARD_BACKBONE_FIELDS, DraftFamily

LLAMA_FAMILY = DraftFamily(
    distribution="dspark-llama",
    config_class=LlamaConfig,  # model_type stays "llama"
    target_model_types=("llama",),
    architecture="LlamaDSparkModel",  # written to config.architectures
    fields=(*STANDARD_BACKBONE_FIELDS, "mlp_bias"),
)
