"""dspark-core: the DSpark draft registry and the draft machinery every target family shares.

Importing this package is cheap: it discovers no plugins and imports no torch. Discovery runs on
the first lookup; the torch-based machinery lives in :mod:`dspark_core.modeling`.
"""

from __future__ import annotations

from dspark_core.errors import (
    DraftClassImportError,
    DraftConfigError,
    DraftSpecConflictError,
    DraftSpecNotFoundError,
    DSparkError,
    DSparkPluginWarning,
    PluginLoadError,
)
from dspark_core.hookspecs import ENTRY_POINT_GROUP, hookimpl
from dspark_core.layer_ids import build_target_layer_ids
from dspark_core.registry import (
    DSPARK_DRAFT_REGISTRY,
    DraftRegistry,
    refresh,
    register_plugin,
    register_spec,
    resolve_dspark_draft_spec,
)
from dspark_core.spec import DraftSpec, DSparkDraftSpec, TrainableDraftSpec
from dspark_core.testing import isolated_registry

__version__ = "0.1.0"

__all__ = [
    "DSPARK_DRAFT_REGISTRY",
    "ENTRY_POINT_GROUP",
    "DSparkDraftSpec",
    "DSparkError",
    "DSparkPluginWarning",
    "DraftClassImportError",
    "DraftConfigError",
    "DraftRegistry",
    "DraftSpec",
    "DraftSpecConflictError",
    "DraftSpecNotFoundError",
    "PluginLoadError",
    "TrainableDraftSpec",
    "build_target_layer_ids",
    "hookimpl",
    "isolated_registry",
    "refresh",
    "register_plugin",
    "register_spec",
    "resolve_dspark_draft_spec",
]
