"""Every exception and warning that dspark raises on purpose.

Each message names the plugin, architecture or field at fault and says how to fix it.
"""

from __future__ import annotations

import sys
import warnings


class DSparkError(Exception):
    """Base class of dspark's own errors.

    ``multiline`` errors list several items (e.g. each failed plugin) and keep one item per line when
    the CLI prints them; every other error is printed on one line.
    """

    multiline: bool = False


class DraftSpecNotFoundError(DSparkError, ValueError):
    """No installed plugin provides a draft for any of the requested architectures.

    A ``ValueError`` so that code written against NeMo AutoModel's registry keeps working.
    """


class DraftSpecConflictError(DSparkError, ValueError):
    """Two distributions register different specs for the same architecture."""


class PluginLoadError(DSparkError, RuntimeError):
    """A plugin failed to load while ``DSPARK_STRICT_PLUGINS=1`` was set (one failure per line)."""

    multiline = True


class DraftClassImportError(DSparkError, ImportError):
    """A spec's lazy ``"module:Class"`` reference could not be imported."""


class DraftConfigError(DSparkError, ValueError):
    """A draft or target configuration field is invalid."""


class DraftFamilyError(DraftConfigError):
    """A saved draft of one family is being loaded for a target (or as a class) of another."""


class CalibrationError(DSparkError, ValueError):
    """A calibration file (``sts.json``, ``dspark_calibration.json``) or cost table that cannot be used."""


class DSparkPluginWarning(UserWarning):
    """A plugin was skipped (failed to load, or was named in a selection variable but not found)."""


def _is_dspark_module(name: object) -> bool:
    # dspark_core and the families' packages (dspark_qwen3, dspark_<family>) are library code.
    return isinstance(name, str) and name.partition(".")[0].startswith("dspark_")


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside dspark's packages: the user's call.

    A fixed ``stacklevel`` cannot do this, since the same check is reached through a family's config
    builder, ``from_target`` or a spec, at different depths.
    """
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and _is_dspark_module(frame.f_globals.get("__name__")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
