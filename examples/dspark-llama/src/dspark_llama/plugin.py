"""The ``dspark.drafts`` entry point. Imports neither torch nor transformers: the class is named lazily."""

from collections.abc import Mapping

from dspark_core import DraftSpec, DSparkDraftSpec, hookimpl


@hookimpl
def dspark_draft_specs() -> Mapping[str, DraftSpec]:
    return {"LlamaForCausalLM": DSparkDraftSpec("dspark_llama.modeling:LlamaDSparkModel")}
