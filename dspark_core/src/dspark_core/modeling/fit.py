"""Whether a draft was built for a target: its depth, vocabulary, hidden size, positions, the
shared embeddings and ``lm_head`` (a reduced vocabulary's own ``lm_head`` is not shared; its ``d2t``
must map into the target's vocabulary). :meth:`DSparkDraftModel.check_fits_target` runs these after the
config's own validation; this module only compares the two models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.model_dirs import text_config_of
from dspark_core.modeling.features import find_target_decoder

_SHARED_WEIGHTS = (
    ("embed_tokens", "get_input_embeddings", "input embeddings"),
    ("lm_head", "get_output_embeddings", "lm_head"),
)
_LOAD_WITH_TARGET = (
    "Load it with `from_pretrained(path, target=target)` or call `draft.attach_target_weights(target)`."
)


def target_text_config(target: nn.Module) -> Any:
    """The target's text config; refuses a module that is not an HF model."""
    config = getattr(target, "config", None)
    if config is None:
        raise TypeError(
            f"the target must be an HF PreTrainedModel with a config, got {type(target).__name__}"
        )
    return text_config_of(config)


def check_config_fits_target(config: Any, target: nn.Module) -> None:
    """Compare a validated draft config with the target it is meant to draft for."""
    target_config = target_text_config(target)
    num_layers = len(find_target_decoder(target)[1])
    target_name = type(target).__name__
    max_positions = getattr(target_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and config.block_size >= max_positions:
        raise DraftConfigError(
            f"draft block_size={config.block_size} does not fit the target's "
            f"max_position_embeddings={max_positions}"
        )
    ids = list(config.target_layer_ids)
    if max(ids) > num_layers - 1:
        raise DraftConfigError(
            f"draft target_layer_ids={ids} do not fit {target_name}, which has {num_layers} decoder layers: "
            f"each id must be -1 (the embeddings) or in [0, {num_layers - 1}]. The draft was built for a "
            "different target."
        )
    if int(config.num_target_layers) != num_layers:
        raise DraftConfigError(
            f"the draft was built for a {config.num_target_layers}-layer target (num_target_layers), but "
            f"{target_name} has {num_layers} decoder layers"
        )
    if int(config.vocab_size) != int(target_config.vocab_size):
        raise DraftConfigError(
            f"draft vocab_size={config.vocab_size} does not match the target's vocab_size="
            f"{target_config.vocab_size}: the draft was built for a different tokenizer"
        )
    draft_hidden = getattr(config, "hidden_size", None)
    if draft_hidden != target_config.hidden_size:
        raise DraftConfigError(
            f"draft hidden_size={draft_hidden} does not match the target's hidden_size="
            f"{target_config.hidden_size}: its context projection expects another target's features"
        )


def check_shares_target_weights(draft: nn.Module, target: nn.Module) -> None:
    """The draft's ``embed_tokens`` and ``lm_head`` must be the target's own (a draft loaded without
    them holds zeros or fresh random values)."""
    reduced = getattr(draft, "d2t", None)
    shared = _SHARED_WEIGHTS[:1] if reduced is not None else _SHARED_WEIGHTS
    if reduced is not None:
        check_draft_vocabulary(reduced, int(target_text_config(target).vocab_size))
    for attribute, getter, what in shared:
        mine = _weight_of(draft, attribute, getter)
        theirs = _weight_of(target, "", getter)
        if mine is None or theirs is None:
            raise DraftConfigError(
                f"cannot compare the draft's {attribute} with the target's {what}: one is missing"
            )
        if tuple(mine.shape) != tuple(theirs.shape):
            raise DraftConfigError(
                f"the draft's {attribute} has shape {tuple(mine.shape)} but the target's {what} has "
                f"{tuple(theirs.shape)}: the draft was built for a different target"
            )
        if not bool(mine.detach().any()):
            raise DraftConfigError(
                f"the draft's {attribute} is all zeros: it was loaded without its target's weights. "
                + _LOAD_WITH_TARGET
            )
        if not _same_weights(mine.detach(), theirs.detach()):
            raise DraftConfigError(
                f"the draft's {attribute} differs from the target's {what}: the draft was loaded without "
                "its target's weights or was built for another target. " + _LOAD_WITH_TARGET
            )


def check_draft_vocabulary(d2t: Tensor, vocab_size: int) -> None:
    """A reduced vocabulary's ``d2t`` must map its ``K`` draft ids to distinct target ids in range."""
    ids = torch.arange(d2t.shape[0], device=d2t.device) + d2t
    if bool((ids < 0).any() or (ids >= vocab_size).any()):
        raise DraftConfigError(
            f"the draft's d2t maps draft ids outside the target's vocabulary [0, {vocab_size}): "
            "it was built for another target or its d2t is corrupt"
        )
    ordered = ids.sort().values
    if bool((ordered[1:] == ordered[:-1]).any()):
        raise DraftConfigError("the draft's d2t maps two draft ids to the same target id: its d2t is corrupt")


def _weight_of(model: nn.Module, attribute: str, getter: str) -> Tensor | None:
    module = getattr(model, attribute, None)
    if not isinstance(module, nn.Module):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _same_weights(a: Tensor, b: Tensor) -> bool:
    # Compare in the coarser of the two dtypes: a bf16 draft holds exact bf16 roundings of fp32 weights.
    coarse = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype
    step = max(1, (1 << 24) // max(1, a.shape[-1]))  # bounded memory for 150k-row vocabularies
    for start in range(0, a.shape[0], step):
        left = a[start : start + step].to(dtype=coarse)
        right = b[start : start + step].to(device=left.device, dtype=coarse)
        if not torch.equal(left, right):
            return False
    return True
