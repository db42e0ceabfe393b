"""The pluggy contract between dspark and its plugins.

A plugin is a plain module named by a ``dspark.drafts`` entry point::

    from dspark_core import DSparkDraftSpec, hookimpl

    @hookimpl
    def dspark_draft_specs():
        spec = DSparkDraftSpec("my_family.modeling:MyDSparkModel")
        return {"MyForCausalLM": spec, "MyMoeForCausalLM": spec}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from dspark_core.spec import DraftSpec
    from dspark_core.targets.builders import TinyTargetBuilder

PROJECT_NAME = "dspark"
ENTRY_POINT_GROUP = "dspark.drafts"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def dspark_draft_specs() -> Mapping[str, DraftSpec]:  # type: ignore[empty-body]
    """Return the draft specs this plugin provides, keyed by target architecture.

    The keys are the strings found in a target config's ``architectures`` (for example
    ``"Qwen3ForCausalLM"``). The module defining this hook must import without torch or
    transformers: name the draft class lazily with ``DSparkDraftSpec("pkg.module:Class")``.
    Every plugin's answer is collected; none overrides another.
    """


@hookspec
def dspark_tiny_target_builders() -> Mapping[str, TinyTargetBuilder | str]:  # type: ignore[empty-body]
    """Optional: builders of small randomly initialised targets, keyed by family name.

    Each value is a callable, or a lazy ``"pkg.module:function"`` reference to one, taking a
    :class:`~dspark_core.targets.builders.TinyTargetShape` and returning a ``PreTrainedModel``
    whose config names its ``architectures``. ``dspark make-tiny-target --family NAME`` uses it for
    random and pretrained targets alike, so core never imports a family.
    """
