"""``Qwen3DSparkModel``: the DSpark draft for Qwen3 targets, on core's standard backbone with
per-head q/k RMSNorm. The layers, heads, masks, objective and decoding all come from
:mod:`dspark_core.modeling`; the published checkpoint layout is the backbone's."""

from __future__ import annotations

from transformers import Qwen3Config

from dspark_core.modeling.backbone import StandardDSparkModel
from dspark_qwen3.config import QWEN3_FAMILY


class Qwen3DSparkModel(StandardDSparkModel):
    """The DSpark draft for Qwen3 and Qwen3-MoE targets, with the published checkpoint layout."""

    config_class = Qwen3Config
    family = QWEN3_FAMILY
    qk_norm = True
