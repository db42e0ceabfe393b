"""Whether a draft was built for a target: vocabulary, feature layers, hidden size, shared weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.features import find_target_decoder


def text_config(target: nn.Module) -> Any:
    config = getattr(target, "config", None)
    if config is None:
        raise TypeError(
            f"the target must be an HF PreTrainedModel with a config, got {type(target).__name__}"
        )
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


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
    rows = a.shape[0]
    step = max(1, (1 << 24) // max(1, a.shape[-1]))  # bounded memory for 150k-row vocabularies
    for start in range(0, rows, step):
        left = a[start : start + step].to(dtype=coarse)
        right = b[start : start + step].to(device=left.device, dtype=coarse)
        if not torch.equal(left, right):
            return False
    return True


def check_draft_fits_target(draft: nn.Module, target: nn.Module) -> None:
    """Raise :class:`~dspark_core.errors.DraftConfigError` if ``draft`` cannot draft for ``target``.

    Checks the draft's ``block_size``, ``mask_token_id``, ``target_layer_ids`` and ``num_target_layers``
    against the target's depth, the vocabulary and hidden sizes, and that the draft's ``embed_tokens``
    and ``lm_head`` are the target's (a draft loaded without them has zeros or fresh random values).
    """
    for method in ("propose", "new_cache"):
        if not callable(getattr(draft, method, None)):
            raise TypeError(
                f"{type(draft).__name__} has no {method}(): the draft must be a DSparkDraftModel "
                "(e.g. dspark_qwen3.Qwen3DSparkModel)"
            )
    draft_config = getattr(draft, "config", None)
    if draft_config is None:
        raise TypeError(f"the draft {type(draft).__name__} has no config")
    target_config = text_config(target)
    _, layers = find_target_decoder(target)
    num_layers = len(layers)
    target_name = type(target).__name__

    block_size = getattr(draft_config, "block_size", None)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DraftConfigError(f"draft config block_size must be a positive int, got {block_size!r}")
    max_positions = getattr(target_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and block_size >= max_positions:
        raise DraftConfigError(
            f"draft block_size={block_size} does not fit the target's max_position_embeddings={max_positions}"
        )

    ids = list(getattr(draft_config, "target_layer_ids", None) or [])
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise DraftConfigError(f"draft config target_layer_ids must be a non-empty list of ints, got {ids!r}")
    if min(ids) < -1 or max(ids) > num_layers - 1:
        raise DraftConfigError(
            f"draft target_layer_ids={ids} do not fit {target_name}, which has {num_layers} decoder layers: "
            f"each id must be -1 (the embeddings) or in [0, {num_layers - 1}]. The draft was built for a "
            "different target."
        )
    declared_layers = getattr(draft_config, "num_target_layers", None)
    if declared_layers is not None and int(declared_layers) != num_layers:
        raise DraftConfigError(
            f"the draft was built for a {declared_layers}-layer target (num_target_layers), but "
            f"{target_name} has {num_layers} decoder layers"
        )

    target_vocab = int(target_config.vocab_size)
    draft_vocab = int(getattr(draft_config, "vocab_size", -1))
    if draft_vocab != target_vocab:
        raise DraftConfigError(
            f"draft vocab_size={draft_vocab} does not match the target's vocab_size={target_vocab}: "
            "the draft was built for a different tokenizer"
        )
    mask_token_id = getattr(draft_config, "mask_token_id", None)
    if (
        isinstance(mask_token_id, bool)
        or not isinstance(mask_token_id, int)
        or not 0 <= mask_token_id < draft_vocab
    ):
        raise DraftConfigError(
            f"draft mask_token_id={mask_token_id!r} is not a token id in [0, vocab_size={draft_vocab})"
        )
    draft_hidden = getattr(draft_config, "hidden_size", None)
    if draft_hidden != target_config.hidden_size:
        raise DraftConfigError(
            f"draft hidden_size={draft_hidden} does not match the target's hidden_size="
            f"{target_config.hidden_size}: its context projection expects another target's features"
        )

    for attribute, getter, what in (
        ("embed_tokens", "get_input_embeddings", "input embeddings"),
        ("lm_head", "get_output_embeddings", "lm_head"),
    ):
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
                f"the draft's {attribute} is all zeros: it was loaded without its target's weights. Load it "
                "with `from_pretrained(path, target=target)` or call `draft.attach_target_weights(target)`."
            )
        if not _same_weights(mine.detach(), theirs.detach()):
            raise DraftConfigError(
                f"the draft's {attribute} differs from the target's {what}: the draft was loaded without "
                "its target's weights or was built for another target. Load it with "
                "`from_pretrained(path, target=target)` or call `draft.attach_target_weights(target)`."
            )
