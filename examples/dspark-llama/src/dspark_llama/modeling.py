"""``LlamaDSparkModel``: the standard backbone without Qwen3's per-head q/k norm."""

from dspark_core.modeling.backbone import StandardDSparkModel
from dspark_llama.config import LLAMA_FAMILY


class LlamaDSparkModel(StandardDSparkModel):
    family = LLAMA_FAMILY  # also gives config_class = LlamaConfig, which from_pretrained needs
    qk_norm = False
