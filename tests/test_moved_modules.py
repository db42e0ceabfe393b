"""Data generation moved out of ``training/``; the old import paths still work for one release."""

from __future__ import annotations

import importlib
import sys

import pytest

MOVED = {
    "dspark_core.training.regenerate": "dspark_core.datagen.regenerate",
    "dspark_core.training.code_demo": "dspark_core.datagen.code_demo",
    "dspark_core.training.demo": "dspark_core.datagen.demo",
    "dspark_core.training.quickstart": "dspark_core.quickstart",
}


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_path_is_the_new_module_with_a_deprecation_warning(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        aliased = importlib.import_module(old)
    assert aliased is importlib.import_module(new)
    # A name imported through the old path is the new module's object, so patches reach both.
    public = [name for name in vars(aliased) if not name.startswith("_")]
    assert public, new
    sys.modules.pop(old, None)
