"""Registry isolation for tests, notebooks and third-party plugin authors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dspark_core.registry import DSPARK_DRAFT_REGISTRY, DraftRegistry


@contextmanager
def isolated_registry(*, autoload: bool | None = None) -> Iterator[DraftRegistry]:
    """Run a block with its own in-process registrations, restored afterwards.

    ``autoload=False`` hides installed entry points, so only what the block registers is seen;
    ``None`` follows ``DSPARK_DISABLE_PLUGIN_AUTOLOAD``. Discovery is redone on entry and exit.
    """
    with DSPARK_DRAFT_REGISTRY.isolated(autoload=autoload) as registry:
        yield registry
