"""Loading a saved draft for a loaded target: its class from the registry, the target's shared
embeddings and head attached when the checkpoint omits them, and one clear error when the files are
damaged. Used by ``dspark generate``, the quickstart and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dspark_core.errors import DSparkError


def load_draft(
    draft_dir: str | Path,
    target: Any,
    *,
    dtype: Any = None,
    flag: str = "--draft",
    allow_family_mismatch: bool = False,
) -> Any:
    """The draft in ``draft_dir``, on the target's device, in eval mode, checked to fit ``target``.

    The draft class is the one the target's family resolves to; a saved draft of another family is
    refused (:class:`~dspark_core.errors.DraftFamilyError`) unless ``allow_family_mismatch``.
    """
    from dspark_core.decoding.fit import check_draft_fits_target
    from dspark_core.model_dirs import architectures_of, require_model_dir
    from dspark_core.modeling.draft import DSparkDraftModel
    from dspark_core.registry import resolve_dspark_draft_spec

    directory = require_model_dir(draft_dir, flag)
    architectures = architectures_of(target.config, "the target config") or [type(target).__name__]
    draft_cls: Any = resolve_dspark_draft_spec(architectures).draft_cls
    load_kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else target.dtype}
    if isinstance(draft_cls, type) and issubclass(draft_cls, DSparkDraftModel):
        # Attaches the target's embeddings and lm_head when the checkpoint omits them.
        load_kwargs["target"] = target
        load_kwargs["allow_family_mismatch"] = allow_family_mismatch
    try:
        draft = draft_cls.from_pretrained(directory, **load_kwargs)
    except (DSparkError, OSError, ValueError):
        raise
    except Exception as exc:  # e.g. SafetensorError on a truncated file
        raise DSparkError(
            f"{flag} {directory}: cannot load its weights ({type(exc).__name__}: {exc}); the files are "
            "truncated or corrupt: export the draft again (dspark verify RUN checks a run's export)"
        ) from exc
    draft = draft.to(next(target.parameters()).device).eval()
    check_draft_fits_target(draft, target)
    return draft
