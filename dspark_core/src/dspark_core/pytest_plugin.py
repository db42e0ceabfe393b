"""The ``dspark_registry`` pytest fixture, installed with dspark-core as a ``pytest11`` plugin.

Use it to test a plugin in-process::

    def test_my_plugin(dspark_registry):
        dspark_registry.register_plugin(my_family.plugin)
        assert resolve_dspark_draft_spec(["MyForCausalLM"]).reference == "my_family.modeling:MyDraft"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dspark_core.registry import DraftRegistry
from dspark_core.testing import isolated_registry


@pytest.fixture
def dspark_registry() -> Iterator[DraftRegistry]:
    """The global registry with installed plugins hidden; registrations are undone afterwards."""
    with isolated_registry(autoload=False) as registry:
        yield registry
