"""Shared fixtures. Plugin distributions are written as real ``.dist-info`` folders on sys.path."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dspark_core import DSPARK_DRAFT_REGISTRY

PluginSiteWriter = Callable[..., Path]


def write_distribution(
    site: Path,
    name: str,
    version: str = "1.0",
    *,
    entry_points: dict[str, str] | None = None,
    modules: dict[str, str] | None = None,
) -> Path:
    """Write an installed distribution (dist-info with METADATA and entry_points.txt) under ``site``."""
    # Underscored dist-info names: hyphens would normalise and two names could collide.
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points is not None:
        lines = ["[dspark.drafts]", *(f"{key} = {value}" for key, value in entry_points.items())]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in (modules or {}).items():
        path = site.joinpath(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return dist_info


def spec_plugin_source(mapping: dict[str, str]) -> str:
    """A plugin module registering ``{architecture: "module:Class"}``."""
    body = ", ".join(f"{arch!r}: DSparkDraftSpec({ref!r})" for arch, ref in mapping.items())
    return (
        "from dspark_core import DSparkDraftSpec, hookimpl\n\n"
        "@hookimpl\n"
        "def dspark_draft_specs():\n"
        f"    return {{{body}}}\n"
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the tests' models are tiny, and two threads fighting over a
    2-core machine made them 10-100x slower. Torch is imported only if a test already did."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSiteWriter]:
    """A fresh site directory on sys.path; call it to install a distribution into it."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    before = set(sys.modules)

    def install(name: str, version: str = "1.0", **kwargs: object) -> Path:
        path = write_distribution(site, name, version, **kwargs)  # type: ignore[arg-type]
        importlib.invalidate_caches()
        DSPARK_DRAFT_REGISTRY.refresh()
        return path

    install.site = site  # type: ignore[attr-defined]
    DSPARK_DRAFT_REGISTRY.refresh()
    yield install
    for module in set(sys.modules) - before:
        if module.startswith("fam_"):
            del sys.modules[module]
    DSPARK_DRAFT_REGISTRY.refresh()
