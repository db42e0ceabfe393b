"""Every exception and warning that dspark raises on purpose.

Each message names the plugin, architecture or field at fault and says how to fix it.
"""

from __future__ import annotations


class DSparkError(Exception):
    """Base class of dspark's own errors."""


class DraftSpecNotFoundError(DSparkError, ValueError):
    """No installed plugin provides a draft for any of the requested architectures.

    A ``ValueError`` so that code written against NeMo AutoModel's registry keeps working.
    """


class DraftSpecConflictError(DSparkError, ValueError):
    """Two distributions register different specs for the same architecture."""


class PluginLoadError(DSparkError, RuntimeError):
    """A plugin failed to load while ``DSPARK_STRICT_PLUGINS=1`` was set."""


class DraftClassImportError(DSparkError, ImportError):
    """A spec's lazy ``"module:Class"`` reference could not be imported."""


class DraftConfigError(DSparkError, ValueError):
    """A draft or target configuration field is invalid."""


class DSparkPluginWarning(UserWarning):
    """A plugin was skipped (failed to load, or was named in a selection variable but not found)."""
