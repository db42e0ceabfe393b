"""Families' tiny-target builders, found through the ``dspark_tiny_target_builders`` hook."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dspark_core.errors import DSparkError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class TinyTargetShape:
    """The sizes and special ids a family's builder turns into its own config."""

    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None  # None: twice the hidden size
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"which must divide by num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 2 * self.hidden_size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TinyTargetBuilder = Callable[[TinyTargetShape], "PreTrainedModel"]


class UnknownFamilyError(DSparkError, ValueError):
    """No installed plugin builds tiny targets of the requested family."""


def _load(reference: TinyTargetBuilder | str, family: str, plugin: str) -> TinyTargetBuilder:
    if not isinstance(reference, str):
        return reference
    module_name, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise DSparkError(
            f"plugin {plugin!r}: tiny-target builder {reference!r} for family {family!r} cannot be "
            f"imported ({type(exc).__name__}: {exc}); fix the reference in its "
            "dspark_tiny_target_builders hook"
        ) from exc


def tiny_target_builders() -> dict[str, tuple[str, TinyTargetBuilder | str]]:
    """``{family: (plugin name, builder or reference)}`` from every loaded plugin, first answer wins."""
    from dspark_core.registry import DSPARK_DRAFT_REGISTRY

    manager = DSPARK_DRAFT_REGISTRY.report().manager
    found: dict[str, tuple[str, TinyTargetBuilder | str]] = {}
    if manager is None:
        return found
    for impl in manager.hook.dspark_tiny_target_builders.get_hookimpls():
        answer = impl.function()
        for family, builder in dict(answer or {}).items():  # type: ignore[call-overload]
            found.setdefault(str(family), (impl.plugin_name, builder))
    return found


def build_tiny_model(family: str, shape: TinyTargetShape, seed: int) -> PreTrainedModel:
    """A randomly initialised target of ``family``; the weights depend only on ``seed``."""
    import torch

    builders = tiny_target_builders()
    if family not in builders:
        known = ", ".join(sorted(builders)) or "none (install a family plugin, e.g. pip install dspark-qwen3)"
        raise UnknownFamilyError(
            f"no plugin builds tiny targets of family {family!r}; known families: {known}"
        )
    plugin, reference = builders[family]
    builder = _load(reference, family, plugin)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(shape)
