"""The ``dspark.drafts`` entry point of dspark-qwen3. Imports neither torch nor transformers."""

from __future__ import annotations

from collections.abc import Mapping

from dspark_core import DraftSpec, DSparkDraftSpec, hookimpl

# One spec object for both architectures: an MoE target still gets a dense draft.
QWEN3_DRAFT_SPEC = DSparkDraftSpec("dspark_qwen3.modeling:Qwen3DSparkModel")


@hookimpl
def dspark_draft_specs() -> Mapping[str, DraftSpec]:
    return {"Qwen3ForCausalLM": QWEN3_DRAFT_SPEC, "Qwen3MoeForCausalLM": QWEN3_DRAFT_SPEC}


@hookimpl
def dspark_tiny_target_builders() -> Mapping[str, str]:
    # Lazy references: this module must stay torch-free.
    return {
        "qwen3": "dspark_qwen3.testing:build_tiny_qwen3",
        "qwen3-moe": "dspark_qwen3.testing:build_tiny_qwen3_moe",
    }
