"""The DSpark fields of a draft config, their defaults and their validation.

A family's config builder copies what its backbone needs from the target config, then calls
:func:`apply_dspark_fields`; every draft model validates its config with
:func:`validate_dspark_config` on construction, so a hand-edited ``config.json`` fails with a
message naming the field rather than deep inside a forward pass. A family on the standard backbone
declares a :class:`DraftFamily` instead, whose :meth:`~DraftFamily.build_config` does both steps.
Torch-free: nothing here imports torch or transformers.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspark_core.errors import DraftConfigError, warn_at_caller
from dspark_core.layer_ids import build_target_layer_ids
from dspark_core.options import MARKOV_HEAD_TYPES
from dspark_core.options import DSparkDraftOptions as DSparkDraftOptions  # re-exported
from dspark_core.validation import require_int

#: The fields the standard backbone reads, copied unchanged from the target config (the Qwen3 set;
#: a field the target lacks is left to the draft config class's default).
STANDARD_BACKBONE_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class TargetLayerWarning(UserWarning):
    """A feature layer that some serving engines (SGLang) cannot capture."""


def _require_int(field: str, value: object, minimum: int) -> int:
    return require_int(f"`{field}`", value, minimum=minimum)


def _token_ids(config: Any, name: str) -> set[int]:
    value = getattr(config, name, None)
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def check_target_layer_ids(ids: Sequence[int], num_target_layers: int) -> list[int]:
    """Validate feature layer ids against the target's depth; warns for SGLang-unservable ids."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise DraftConfigError(f"`target_layer_ids` must be a list of ints, got {ids!r}")
    checked = [_require_int("target_layer_ids", i, -1) for i in ids]
    if not checked:
        raise DraftConfigError("`target_layer_ids` is empty; give at least one target layer id")
    if any(b <= a for a, b in itertools.pairwise(checked)):
        raise DraftConfigError(f"`target_layer_ids` must be strictly increasing, got {checked}")
    if checked[-1] > num_target_layers - 1:
        raise DraftConfigError(
            f"`target_layer_ids` {checked} is out of range for a target with {num_target_layers} layers: "
            f"ids must lie in [-1, {num_target_layers - 1}]"
        )
    unservable = [i for i in checked if i in (-1, num_target_layers - 1)]
    if unservable:
        warn_at_caller(
            f"target_layer_ids contains {unservable}: SGLang cannot capture layer -1 (the embeddings) or "
            f"layer {num_target_layers - 1} (post final norm), so this draft will not serve there",
            TargetLayerWarning,
        )
    return checked


def apply_dspark_fields(config: Any, options: DSparkDraftOptions, *, num_target_layers: int) -> Any:
    """Write the DSpark fields of ``options`` onto ``config`` (a copy of the target's) and validate."""
    num_draft_layers = _require_int("num_draft_layers", options.num_draft_layers, 1)
    if options.target_layer_ids is not None:
        layer_ids = list(options.target_layer_ids)
    else:
        features = options.num_feature_layers if options.num_feature_layers is not None else num_draft_layers
        layer_ids = build_target_layer_ids(num_target_layers, _require_int("num_feature_layers", features, 1))
    if options.mask_token_id is None:
        raise DraftConfigError(
            "`mask_token_id` is required: pick an id in [0, vocab_size) that the data never uses "
            "(not pad or eos), e.g. a reserved special token (151669 for Qwen3)"
        )
    config.num_hidden_layers = num_draft_layers
    config.num_target_layers = num_target_layers
    config.layer_types = ["full_attention"] * num_draft_layers
    config.tie_word_embeddings = False
    config.block_size = options.block_size
    config.mask_token_id = options.mask_token_id
    config.target_layer_ids = layer_ids
    config.num_anchors = options.num_anchors
    config.markov_rank = options.markov_rank
    config.enable_confidence_head = options.enable_confidence_head
    # The method's key layout: head type only with a Markov head, the Markov flag only with the head.
    for name in ("markov_head_type", "confidence_head_with_markov"):
        if hasattr(config, name):
            delattr(config, name)
    if options.markov_rank > 0:
        config.markov_head_type = options.markov_head_type
    if options.enable_confidence_head:
        config.confidence_head_with_markov = options.confidence_head_with_markov
    # Written only when it reduces the vocabulary: full-vocabulary configs keep their key set.
    if hasattr(config, "draft_vocab_size"):
        delattr(config, "draft_vocab_size")
    if options.draft_vocab_size is not None:
        vocab = _require_int("vocab_size", config.vocab_size, 1)
        reduced = _require_int("draft_vocab_size", options.draft_vocab_size, 1)
        if reduced > vocab:
            raise DraftConfigError(
                f"`draft_vocab_size` {reduced} exceeds the target's vocab_size {vocab}; give K <= {vocab} "
                "(K = vocab_size, or no draft_vocab_size, keeps the full vocabulary)"
            )
        if reduced < vocab:
            config.draft_vocab_size = reduced
    validate_dspark_config(config)
    # validate_dspark_config silences the SGLang warning (it runs on every load): give it here, once.
    check_target_layer_ids(layer_ids, num_target_layers)
    return config


def validate_dspark_config(config: Any) -> None:
    """Check every DSpark field of a draft config; raises :class:`DraftConfigError` naming the field."""
    for name in ("block_size", "mask_token_id", "target_layer_ids", "num_target_layers", "vocab_size"):
        if getattr(config, name, None) is None:
            raise DraftConfigError(
                f"draft config lacks `{name}`; build drafts with the family's config_from_target() "
                "or from_target() rather than from a plain target config"
            )
    vocab = _require_int("vocab_size", config.vocab_size, 1)
    _require_int("block_size", config.block_size, 1)
    _require_int("num_anchors", getattr(config, "num_anchors", 1), 1)
    num_target_layers = _require_int("num_target_layers", config.num_target_layers, 1)
    mask = _require_int("mask_token_id", config.mask_token_id, 0)
    if mask >= vocab:
        raise DraftConfigError(f"`mask_token_id` {mask} is outside the vocabulary [0, {vocab})")
    for special in ("pad_token_id", "eos_token_id"):
        if mask in _token_ids(config, special):
            raise DraftConfigError(
                f"`mask_token_id` {mask} equals the {special}; choose an unused token id such as a "
                "reserved special token"
            )
    with warnings.catch_warnings():
        # validated again on every load; the SGLang warning is given once, when the config is built
        warnings.simplefilter("ignore", TargetLayerWarning)
        check_target_layer_ids(config.target_layer_ids, num_target_layers)
    reduced = getattr(config, "draft_vocab_size", None)
    if reduced is not None and not 1 <= _require_int("draft_vocab_size", reduced, 1) <= vocab:
        raise DraftConfigError(
            f"`draft_vocab_size` {reduced} exceeds `vocab_size` {vocab}; it must lie in [1, {vocab}]"
        )
    rank = _require_int("markov_rank", getattr(config, "markov_rank", 0), 0)
    if rank > 0:
        head_type = getattr(config, "markov_head_type", "vanilla")
        if head_type not in MARKOV_HEAD_TYPES:
            raise DraftConfigError(
                f"`markov_head_type` {head_type!r} is unknown; choose one of {', '.join(MARKOV_HEAD_TYPES)}"
            )
    if (
        getattr(config, "enable_confidence_head", False)
        and getattr(config, "confidence_head_with_markov", False)
        and rank == 0
    ):
        raise DraftConfigError(
            "`confidence_head_with_markov` is true but `markov_rank` is 0: the confidence head has no "
            "Markov features to read. Set confidence_head_with_markov=False or markov_rank > 0"
        )


def draft_vocab_size_of(config: Any) -> int:
    """The size of the draft's own vocabulary (its ``lm_head`` rows): ``draft_vocab_size`` when the
    config has one, else the target's ``vocab_size``."""
    reduced = getattr(config, "draft_vocab_size", None)
    return int(config.vocab_size if reduced is None else reduced)


def has_reduced_vocabulary(config: Any) -> bool:
    """Whether the draft proposes from fewer tokens than the target's vocabulary (and so has ``d2t``)."""
    return draft_vocab_size_of(config) < int(config.vocab_size)


#: What this library's loader does when a config.json omits a key DeepSpec's evaluator requires (no
#: Markov head, no confidence head, a vanilla head, a confidence head without Markov features; the
#: method's N for the training-only num_anchors). An export writes them all.
LOADER_DEFAULTS: dict[str, Any] = {
    "num_anchors": DSparkDraftOptions.num_anchors,
    "markov_rank": 0,
    "enable_confidence_head": False,
}


def fill_loader_defaults(config: Any) -> None:
    """Write onto ``config`` the loader's value of each DeepSpec-required key it lacks.

    DeepSpec's Qwen3DSparkModel asserts ``num_anchors``, ``target_layer_ids``, ``mask_token_id``,
    ``markov_rank``, ``enable_confidence_head``, ``markov_head_type`` (when markov_rank > 0) and
    ``confidence_head_with_markov`` (with the confidence head) are present; an older or hand-written
    config may omit the ones this library defaults. Present keys are never changed.
    """
    for name, value in LOADER_DEFAULTS.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    if int(config.markov_rank) > 0 and getattr(config, "markov_head_type", None) is None:
        config.markov_head_type = "vanilla"
    if config.enable_confidence_head and getattr(config, "confidence_head_with_markov", None) is None:
        config.confidence_head_with_markov = False


def parse_draft_options(options: Mapping[str, Any]) -> DSparkDraftOptions:
    """``DSparkDraftOptions(**options)``, with an unknown option named in a :class:`DraftConfigError`."""
    try:
        return DSparkDraftOptions(**options)
    except TypeError as exc:
        known = ", ".join(DSparkDraftOptions.__dataclass_fields__)
        raise DraftConfigError(f"{exc}; the draft options are: {known}") from None


@dataclass(frozen=True)
class DraftFamily:
    """What a family on the standard backbone declares to turn a target config into a draft config.

    ``config_class`` is the draft config's class (usually the target's, so ``model_type`` is the
    target family's, which is how serving engines recognise the draft), ``architecture`` the draft
    class's name (written to ``config.architectures``), ``fields`` the target fields the backbone
    copies, and ``fallbacks`` ``{field: other}`` reads ``other`` when the target leaves ``field`` None
    (an MoE target's ``intermediate_size`` from ``moe_intermediate_size``).
    """

    distribution: str
    config_class: type[Any]
    target_model_types: tuple[str, ...]
    architecture: str
    fields: tuple[str, ...] = STANDARD_BACKBONE_FIELDS
    fallbacks: Mapping[str, str] = field(default_factory=dict)

    def copied_fields(self, target_config: Any) -> dict[str, Any]:
        """The backbone fields of ``target_config``; raises if it is not one of this family's."""
        model_type = getattr(target_config, "model_type", None)
        if model_type not in self.target_model_types:
            raise DraftConfigError(
                f"{self.distribution} builds drafts for targets of model_type "
                f"{' or '.join(self.target_model_types)}, but this target config has model_type "
                f"{model_type!r}; install the dspark plugin for that family"
            )
        fields = {name: getattr(target_config, name) for name in self.fields if hasattr(target_config, name)}
        for name, other in self.fallbacks.items():
            if getattr(target_config, name, None) is None and getattr(target_config, other, None) is not None:
                fields[name] = getattr(target_config, other)
        return fields

    def build_config(self, target_config: Any, **options: Any) -> Any:
        """The draft config for ``target_config`` with the DSpark ``options`` (see DSparkDraftOptions)."""
        fields = self.copied_fields(target_config)
        draft_options = parse_draft_options(options)
        config = self.config_class(**fields)
        config.architectures = [self.architecture]
        apply_dspark_fields(config, draft_options, num_target_layers=int(target_config.num_hidden_layers))
        return config
