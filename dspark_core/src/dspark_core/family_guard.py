"""The family guard: a saved draft loads only as the draft class of its own family.

A draft's ``config.json`` names its class (``architectures``) and its config class (``model_type``).
Loaded as another family's class, it loads without an error but wrongly: a Qwen3 draft read by the
Llama family's class drops its q/k norm. :func:`check_draft_family` compares the saved names with
the ones expected and raises one :class:`~dspark_core.errors.DraftFamilyError` naming both, unless
the caller allows the mismatch. Torch-free: used by ``from_pretrained``, ``dspark generate`` (through
``load_draft``) and ``dspark check-draft --target``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dspark_core.errors import DraftFamilyError

__all__ = ["OVERRIDE_HINT", "check_draft_family", "saved_family"]

OVERRIDE_HINT = "pass allow_family_mismatch=True (CLI: --allow-family-mismatch) to load it anyway"


def saved_family(config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """``(architectures, model_type)`` as a saved ``config.json`` states them (either may be empty)."""
    value = config.get("architectures") or []
    names = [value] if isinstance(value, str) else [str(name) for name in value]
    model_type = config.get("model_type")
    return names, str(model_type) if model_type else None


def _describe(architectures: Sequence[str], model_types: Sequence[str]) -> str:
    name = "/".join(architectures) if architectures else "an unnamed draft class"
    types = " or ".join(repr(t) for t in model_types)
    return f"{name} (model_type {types})" if types else name


def check_draft_family(
    config: Mapping[str, Any],
    *,
    source: str,
    expected_architecture: str,
    expected_model_types: Sequence[str] = (),
    loaded_as: str,
    allow_mismatch: bool = False,
) -> None:
    """Raise :class:`DraftFamilyError` when the saved draft is not of the expected family.

    The architectures must name ``expected_architecture`` (when the config has any) and the
    model_type must be one of ``expected_model_types`` (when both are known). ``loaded_as`` says how
    the draft is being loaded, e.g. "the target LlamaForCausalLM resolves to LlamaDSparkModel".
    """
    if allow_mismatch:
        return
    architectures, model_type = saved_family(config)
    wrong_class = bool(architectures) and expected_architecture not in architectures
    wrong_type = bool(model_type and expected_model_types) and model_type not in expected_model_types
    if not (wrong_class or wrong_type):
        return
    expected = _describe([expected_architecture], expected_model_types)
    found = _describe(architectures, [model_type] if model_type else [])
    raise DraftFamilyError(
        f"{source} is a {found} draft, but {loaded_as} {expected}: a draft "
        f"of another family loads with the wrong layers; use a draft trained for this target, or "
        f"{OVERRIDE_HINT}"
    )
