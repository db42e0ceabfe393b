"""The ``dspark.drafts`` entry point of dspark-qwen3. Imports neither torch nor transformers."""

from __future__ import annotations

from collections.abc import Mapping

from dspark_core import DraftSpec, DSparkDraftSpec, hookimpl

# One spec object for both architectures: an MoE target still gets a dense draft.
QWEN3_DRAFT_SPEC = DSparkDraftSpec("dspark_qwen3.modeling:Qwen3DSparkModel")


@hookimpl
def dspark_draft_specs() -> Mapping[str, DraftSpec]:
    return {"Qwen3ForCausalLM": QWEN3_DRAFT_SPEC, "Qwen3MoeForCausalLM": QWEN3_DRAFT_SPEC}
