"""``check_draft_fits_target``: the decoding entry to :meth:`DSparkDraftModel.check_fits_target`,
which also accepts a draft of another class if it has the same interface."""

from __future__ import annotations

from torch import nn


def check_draft_fits_target(draft: nn.Module, target: nn.Module) -> None:
    """Raise :class:`~dspark_core.errors.DraftConfigError` if ``draft`` cannot draft for ``target``.

    The draft's config is validated as a whole, then compared with the target's depth, vocabulary,
    hidden size and positions, and its ``embed_tokens`` and ``lm_head`` must be the target's.
    """
    for method in ("propose", "new_cache", "check_fits_target"):
        if not callable(getattr(draft, method, None)):
            raise TypeError(
                f"{type(draft).__name__} has no {method}(): the draft must be a DSparkDraftModel "
                "(e.g. dspark_qwen3.Qwen3DSparkModel)"
            )
    if getattr(draft, "config", None) is None:
        raise TypeError(f"the draft {type(draft).__name__} has no config")
    draft.check_fits_target(target)  # type: ignore[operator]
