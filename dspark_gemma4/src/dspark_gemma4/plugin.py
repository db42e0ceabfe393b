"""The ``dspark.drafts`` entry point of dspark-gemma4. Imports neither torch nor transformers."""

from __future__ import annotations

from collections.abc import Mapping

from dspark_core import DraftSpec, DSparkDraftSpec, hookimpl

# One draft class for every Gemma 4 text stack: the multimodal targets draft from their text config.
GEMMA4_DRAFT_SPEC = DSparkDraftSpec("dspark_gemma4.modeling:Gemma4DSparkModel")

#: The target architectures DeepSpec's Gemma 4 DSpark config builder accepts (model_type gemma4 or
#: gemma4_unified at the top level, or their text stacks alone).
GEMMA4_ARCHITECTURES = (
    "Gemma4ForConditionalGeneration",
    "Gemma4ForCausalLM",
    "Gemma4UnifiedForConditionalGeneration",
    "Gemma4UnifiedForCausalLM",
)


@hookimpl
def dspark_draft_specs() -> Mapping[str, DraftSpec]:
    return dict.fromkeys(GEMMA4_ARCHITECTURES, GEMMA4_DRAFT_SPEC)


@hookimpl
def dspark_tiny_target_builders() -> Mapping[str, str]:
    # Lazy reference: this module must stay torch-free.
    return {"gemma4": "dspark_gemma4.testing:build_tiny_gemma4"}
