"""Old import paths kept for one release: the old module name becomes an alias of the new one."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_moved_module(old_name: str, new_name: str) -> None:
    """Make ``old_name`` the module ``new_name`` (same object, so patches apply to both), with a warning.

    Called from the old module's body; ``stacklevel`` 3 points past this function and the old module
    at the user's import (importlib's own frames are skipped by ``warnings``).
    """
    warnings.warn(
        f"{old_name} moved to {new_name}; import it from there (the old path is removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old_name] = importlib.import_module(new_name)
