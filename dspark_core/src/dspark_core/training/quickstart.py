"""Deprecated: moved to :mod:`dspark_core.quickstart` (this alias is removed in the next release)."""

from dspark_core._moved import alias_moved_module

alias_moved_module(__name__, "dspark_core.quickstart")
