"""Discovery of draft specs from installed plugins, and the lookup training code uses.

Discovery reads the ``dspark.drafts`` entry points of every installed distribution, loads the
selected plugin modules into a pluggy ``PluginManager``, calls each plugin's
``dspark_draft_specs`` hook separately and merges the answers. It never imports model code:
specs name their classes lazily. A plugin that fails is recorded and skipped (or, with
``DSPARK_STRICT_PLUGINS=1``, raised on lookup), so one broken plugin cannot take the host down.

Selection (``DSPARK_DISABLE_PLUGINS`` / ``DSPARK_PLUGINS``) names an entry point, a distribution, or
``distribution:entry-point``; the last two pick exactly one distribution, which is what conflict
hints suggest. A name that matches nothing, or several distributions, is warned about.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import ModuleType, SimpleNamespace
from typing import Any, Literal

import pluggy

from dspark_core import hookspecs
from dspark_core.errors import (
    DraftSpecConflictError,
    DraftSpecNotFoundError,
    DSparkPluginWarning,
    PluginLoadError,
    warn_at_caller,
)
from dspark_core.spec import DraftSpec, DSparkDraftSpec, spec_reference

ENV_DISABLE = "DSPARK_DISABLE_PLUGINS"
ENV_ALLOW = "DSPARK_PLUGINS"
ENV_NO_AUTOLOAD = "DSPARK_DISABLE_PLUGIN_AUTOLOAD"
ENV_STRICT = "DSPARK_STRICT_PLUGINS"

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")

PluginStatus = Literal["ok", "failed", "blocked"]
EntryStatus = Literal["ok", "conflict"]


@dataclass(frozen=True)
class PluginInfo:
    """One plugin: an entry point of an installed distribution, or an in-process registration."""

    name: str
    distribution: str | None
    version: str | None
    value: str | None
    status: PluginStatus = "ok"
    #: For a blocked plugin, the variable that blocked it (``DSPARK_DISABLE_PLUGINS`` or ``DSPARK_PLUGINS``).
    blocked_by: str | None = None

    @property
    def label(self) -> str:
        """A human-readable origin, e.g. ``plugin 'qwen3' (dspark-qwen3 0.1.0)``."""
        if self.distribution is None:
            return f"in-process plugin {self.name!r}"
        return f"plugin {self.name!r} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    plugin: PluginInfo
    stage: Literal["entry-point", "import", "validation", "hook", "result"]
    error: str

    def __str__(self) -> str:
        where = f" = {self.plugin.value}" if self.plugin.value else ""
        return f"{self.plugin.label}{where}: {self.stage} failed: {' '.join(self.error.split())}"


@dataclass(frozen=True)
class ArchitectureEntry:
    """What the installed plugins say about one architecture."""

    architecture: str
    providers: tuple[tuple[PluginInfo, DraftSpec], ...]
    status: EntryStatus
    #: Per provider, a ``DSPARK_DISABLE_PLUGINS`` selector matching its plugin alone among the
    #: installed ones (``None`` for in-process plugins, which the variables do not affect).
    selectors: tuple[str | None, ...] = ()

    @property
    def spec(self) -> DraftSpec:
        """The resolved spec; raises the conflict error if plugins disagree."""
        if self.status == "conflict":
            raise DraftSpecConflictError(self.conflict_message())
        return self.providers[0][1]

    @property
    def plugin(self) -> PluginInfo:
        """The plugin whose spec is used."""
        return self.providers[0][0]

    @property
    def reference(self) -> str:
        """The ``"module:Class"`` of the spec used (the first provider's on a conflict)."""
        return spec_reference(self.providers[0][1])

    def conflict_message(self) -> str:
        """What conflicts, and for each provider the selector that keeps it alone."""
        sides = "; ".join(f"{info.label} -> {spec_reference(spec)}" for info, spec in self.providers)
        selectors = list(self.selectors) or [None] * len(self.providers)
        choices = []
        for index, (info, _) in enumerate(self.providers):
            others = [selector for i, selector in enumerate(selectors) if i != index and selector]
            if len(others) == len(selectors) - 1:  # every other provider can be disabled
                choices.append(f"{ENV_DISABLE}={','.join(dict.fromkeys(others))} keeps {info.label}")
        if choices:
            hint = "Keep one with a selector that names one distribution: " + ", or ".join(choices)
            hint += "; or uninstall one"
        else:
            hint = "Uninstall one, or unregister the in-process plugin"
        if any(info.distribution is None for info, _ in self.providers):
            hint += (
                " (an in-process registration can replace the others with register_spec(..., override=True))"
            )
        return (
            f"architecture {self.architecture!r} is registered with different draft specs by several "
            f"plugins: {sides}. {hint}."
        )


@dataclass
class DiscoveryReport:
    """Everything one discovery pass found."""

    entries: dict[str, ArchitectureEntry] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    #: Names in the selection variables that match no installed plugin / several distributions.
    unknown_selection: list[str] = field(default_factory=list)
    ambiguous_selection: list[str] = field(default_factory=list)
    #: One message per unknown or ambiguous name, as warned (the CLI prints them on stderr).
    selection_warnings: list[str] = field(default_factory=list)
    #: False when entry points were not loaded (``DSPARK_DISABLE_PLUGIN_AUTOLOAD`` or isolation).
    autoload: bool = True
    #: The plugin manager holding every loaded plugin, for the other hooks (``tiny_target_builders``).
    manager: pluggy.PluginManager | None = None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name_list(variable: str) -> frozenset[str]:
    raw = os.environ.get(variable, "")
    return frozenset(
        ":".join(_normalise(side.strip()) for side in part.split(":", 1))
        for part in raw.split(",")
        if part.strip()
    )


def _selectors(distribution_key: str, entry_point: str) -> set[str]:
    """Every selection name that matches this entry point."""
    name = _normalise(entry_point)
    return {name, distribution_key, f"{distribution_key}:{name}"}


@dataclass(frozen=True)
class _Selection:
    deny: frozenset[str]
    allow: frozenset[str]

    @classmethod
    def from_env(cls) -> _Selection:
        return cls(_name_list(ENV_DISABLE), _name_list(ENV_ALLOW))

    @property
    def names(self) -> frozenset[str]:
        return self.deny | self.allow

    def blocked_by(self, selectors: set[str]) -> str | None:
        if selectors & self.deny:
            return ENV_DISABLE
        if self.allow and not selectors & self.allow:
            return ENV_ALLOW
        return None

    def variable(self, name: str) -> str:
        return ENV_DISABLE if name in self.deny else ENV_ALLOW


def _name_and_version(dist: metadata.Distribution) -> tuple[str, str]:
    # Reads only the header lines: the email parser behind dist.metadata costs more than the rest of
    # a plugin's discovery, and start-up time is what `dspark list` is judged on.
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the headers end at the first blank line
        key, _, value = line.partition(":")
        if key in ("Name", "Version") and key not in fields:
            fields[key] = value.strip()
    if "Name" not in fields:
        fields["Name"] = dist.metadata["Name"] or ""
    return fields["Name"], fields.get("Version", "?")


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}


def strict_mode() -> bool:
    """Whether ``DSPARK_STRICT_PLUGINS`` is set: plugin failures are errors on lookup."""
    return _flag(ENV_STRICT)


def strict_failure_message(failures: Sequence[PluginFailure]) -> str:
    """The ``DSPARK_STRICT_PLUGINS`` error: one failed plugin per line."""
    details = "".join(f"\n  {failure}" for failure in failures)
    return (
        f"{len(failures)} dspark plugin(s) failed to load and {ENV_STRICT} is set:{details}\n"
        f"Fix or uninstall them, or exclude them with {ENV_DISABLE}=<name> (see `dspark list`)."
    )


def _provider_selector(
    info: PluginInfo, providers: Sequence[tuple[PluginInfo, DraftSpec]], plugins: Sequence[PluginInfo]
) -> str | None:
    # The distribution name, unless another distribution has an entry point of that name or the
    # same distribution is on both sides; then distribution:entry-point, which is always unique.
    if info.distribution is None:
        return None
    dist = _normalise(info.distribution)
    shadowed = any(
        p.distribution is not None and _normalise(p.name) == dist and _normalise(p.distribution) != dist
        for p in plugins
    )
    rivals = sum(1 for other, _ in providers if other.distribution and _normalise(other.distribution) == dist)
    return f"{info.distribution}:{info.name}" if shadowed or rivals > 1 else info.distribution


def _looks_like_spec(value: object) -> bool:
    # Checked statically: isinstance() against a runtime protocol would evaluate the draft_cls
    # property on Python 3.11 and import the model, which discovery must never do.
    if isinstance(value, DSparkDraftSpec):
        return True
    return any("draft_cls" in vars(klass) for klass in type(value).__mro__) or (
        "draft_cls" in getattr(value, "__dict__", {})
    )


class DraftRegistry(Mapping[str, DraftSpec]):
    """A read-only mapping from target architecture to draft spec, discovered lazily.

    Every architecture a plugin registers is in the mapping. One that several plugins register with
    different specs is *present but unresolvable*: it is in ``in``, iteration and ``len``, and
    ``[]`` or :meth:`resolve` raise :class:`DraftSpecConflictError` (so ``dict(registry)`` does too);
    the not-found message lists it apart from the supported ones. Register plugins at run time with
    :meth:`register_plugin` or :meth:`register_spec`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._report: DiscoveryReport | None = None
        self._pid: int | None = None
        self._in_process: list[tuple[str, object]] = []
        self._overrides: dict[str, tuple[PluginInfo, DraftSpec]] = {}
        self._autoload: bool | None = None
        self._warned: set[str] = set()
        # A child forked while another thread held the lock (mid-discovery) would wait on it forever:
        # give the child a fresh lock and no report, so it discovers again on its own.
        owner = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(owner))

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._report = None
        self._pid = None

    # -- discovery ---------------------------------------------------------------------------

    def report(self, *, strict: bool | None = None) -> DiscoveryReport:
        """The result of discovery, running it once per process (again in a forked child).

        With ``strict`` (default: ``DSPARK_STRICT_PLUGINS``) any plugin failure raises
        :class:`PluginLoadError`, one failure per line; ``strict=False`` always returns the report,
        which is how ``dspark list`` shows every failure in strict mode.
        """
        with self._lock:
            if self._report is None or self._pid != os.getpid():
                report = self._discover()
                self._report, self._pid = report, os.getpid()
            report = self._report
        if (_flag(ENV_STRICT) if strict is None else strict) and report.failures:
            raise PluginLoadError(strict_failure_message(report.failures))
        return report

    def refresh(self) -> None:
        """Forget what was discovered, so the next lookup rescans installed distributions."""
        with self._lock:
            importlib.invalidate_caches()
            self._report = None

    def _discover(self) -> DiscoveryReport:
        report = DiscoveryReport()
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        infos: dict[str, PluginInfo] = {}

        report.autoload = self._autoload if self._autoload is not None else not _flag(ENV_NO_AUTOLOAD)
        if report.autoload:
            self._load_entry_points(manager, infos, report)
        for name, plugin in self._in_process:
            info = PluginInfo(name=name, distribution=None, version=None, value=None)
            self._register(manager, f"in-process:{name}", plugin, info, infos, report)

        answers: list[tuple[PluginInfo, dict[str, DraftSpec]]] = []
        for impl in manager.hook.dspark_draft_specs.get_hookimpls():
            info = infos[impl.plugin_name]
            try:
                result = impl.function()
            except Exception as exc:
                self._fail(report, info, "hook", f"{type(exc).__name__}: {exc}")
                continue
            specs = self._validate_answer(result, info, report)
            if specs is not None:
                answers.append((info, specs))

        failed = {(f.plugin.name, f.plugin.distribution) for f in report.failures}
        blocked = report.plugins
        report.plugins = [
            _with_status(p, "failed" if (p.name, p.distribution) in failed else "ok") for p in infos.values()
        ] + blocked
        self._merge(answers, report)
        report.manager = manager
        return report

    def _load_entry_points(
        self, manager: pluggy.PluginManager, infos: dict[str, PluginInfo], report: DiscoveryReport
    ) -> None:
        selection = _Selection.from_env()
        hits: dict[str, set[str]] = {name: set() for name in selection.names}
        seen: set[str] = set()
        for dist in metadata.distributions():
            group = dist.entry_points.select(group=hookspecs.ENTRY_POINT_GROUP)
            if not group:
                continue
            dist_name, version = _name_and_version(dist)
            key = _normalise(dist_name)
            if key in seen:
                # The same distribution twice (stale metadata, or on two sys.path entries): the
                # first one wins, as importlib itself resolves imports.
                report.duplicates.append(f"{dist_name} {version}")
                continue
            seen.add(key)
            for ep in group:
                info = PluginInfo(name=ep.name, distribution=dist_name, version=version, value=ep.value)
                selectors = _selectors(key, ep.name)
                for name in selectors & selection.names:
                    hits[name].add(f"{dist_name} {version}")
                blocked_by = selection.blocked_by(selectors)
                if blocked_by is not None:
                    report.plugins.append(replace(info, status="blocked", blocked_by=blocked_by))
                    continue
                self._load_entry_point(manager, f"ep:{key}:{ep.name}", ep, info, infos, report)
        self._check_selection(selection, hits, report)

    def _load_entry_point(
        self,
        manager: pluggy.PluginManager,
        key: str,
        ep: metadata.EntryPoint,
        info: PluginInfo,
        infos: dict[str, PluginInfo],
        report: DiscoveryReport,
    ) -> None:
        if not _MODULE_PATH.match(ep.value.strip()):
            self._fail(
                report,
                info,
                "entry-point",
                f"malformed value {ep.value!r}; a dspark.drafts entry point names a module, "
                "e.g. 'dspark_family.plugin'",
            )
            infos[key] = info
            return
        try:
            plugin = ep.load()
        except Exception as exc:
            self._fail(report, info, "import", f"{type(exc).__name__}: {exc}")
            infos[key] = info
            return
        self._register(manager, key, plugin, info, infos, report)

    def _check_selection(
        self, selection: _Selection, hits: dict[str, set[str]], report: DiscoveryReport
    ) -> None:
        for name in sorted(hits):
            variable, matched = selection.variable(name), sorted(hits[name])
            if not matched:
                report.unknown_selection.append(name)
                message = (
                    f"{variable} names {name!r}, which matches no installed dspark plugin (give an "
                    "entry-point name, a distribution name or distribution:entry-point; see `dspark list`)"
                )
            elif len(matched) > 1:
                report.ambiguous_selection.append(name)
                message = (
                    f"{variable} names {name!r}, which matches plugins of {len(matched)} distributions "
                    f"({', '.join(matched)}); name one distribution, or write distribution:entry-point, "
                    "to pick one"
                )
            else:
                continue
            report.selection_warnings.append(message)
            self._warn_once(message, message)

    def _register(
        self,
        manager: pluggy.PluginManager,
        key: str,
        plugin: object,
        info: PluginInfo,
        infos: dict[str, PluginInfo],
        report: DiscoveryReport,
    ) -> None:
        infos[key] = info
        try:
            manager.register(plugin, name=key)
            # Reports hook implementations with no matching spec, i.e. misspelt hook names.
            manager.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if manager.is_registered(plugin):
                manager.unregister(plugin)
            self._fail(report, info, "validation", str(exc))

    def _validate_answer(
        self, result: object, info: PluginInfo, report: DiscoveryReport
    ) -> dict[str, DraftSpec] | None:
        if not isinstance(result, Mapping):
            self._fail(
                report,
                info,
                "result",
                f"dspark_draft_specs returned {type(result).__name__}; it must return a mapping of "
                "architecture name to DSparkDraftSpec",
            )
            return None
        specs: dict[str, DraftSpec] = {}
        for architecture, spec in result.items():
            if not isinstance(architecture, str) or not architecture:
                self._fail(
                    report, info, "result", f"architecture key {architecture!r} is not a non-empty str"
                )
                return None
            if not _looks_like_spec(spec):
                self._fail(
                    report,
                    info,
                    "result",
                    f"value for {architecture!r} is a {type(spec).__name__}, not a draft spec; "
                    "use DSparkDraftSpec('package.module:ClassName')",
                )
                return None
            if isinstance(spec, DSparkDraftSpec):
                spec = spec.with_provider(info.label)
            specs[architecture] = spec
        return specs

    def _merge(self, answers: list[tuple[PluginInfo, dict[str, DraftSpec]]], report: DiscoveryReport) -> None:
        providers: dict[str, list[tuple[PluginInfo, DraftSpec]]] = {}
        for info, specs in answers:
            for architecture, spec in specs.items():
                providers.setdefault(architecture, []).append((info, spec))
        for architecture, (info, spec) in self._overrides.items():
            providers[architecture] = [(info, spec)]
        for architecture, found in providers.items():
            distinct = {spec_reference(spec) for _, spec in found}
            status: EntryStatus = "ok" if len(distinct) == 1 else "conflict"
            selectors = tuple(_provider_selector(info, found, report.plugins) for info, _ in found)
            report.entries[architecture] = ArchitectureEntry(architecture, tuple(found), status, selectors)

    def _fail(self, report: DiscoveryReport, info: PluginInfo, stage: Any, error: str) -> None:
        failure = PluginFailure(plugin=_with_status(info, "failed"), stage=stage, error=error)
        report.failures.append(failure)
        if not _flag(ENV_STRICT):  # in strict mode the failure is raised on lookup instead
            self._warn_once(str(failure), f"skipping dspark {failure}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_at_caller(message, DSparkPluginWarning)

    # -- in-process registration -------------------------------------------------------------

    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object (a module or an object with ``@hookimpl`` methods) in-process."""
        plugin_name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
        with self._lock:
            if any(existing == plugin_name for existing, _ in self._in_process):
                raise ValueError(
                    f"an in-process dspark plugin named {plugin_name!r} is already registered; "
                    "unregister it first, or use register_spec(..., override=True)"
                )
            self._in_process.append((plugin_name, plugin))
            self._report = None
        return plugin_name

    def register_spec(
        self, architecture: str, spec: DraftSpec | type[Any] | str, *, override: bool = False
    ) -> None:
        """Register one architecture's spec in-process.

        By default it is merged like any plugin's answer, so a different spec for an architecture
        another plugin provides is a conflict. ``override=True`` replaces every other provider.
        """
        if not isinstance(architecture, str) or not architecture:
            raise TypeError(f"architecture must be a non-empty str, got {architecture!r}")
        resolved: DraftSpec
        if isinstance(spec, str | type):
            resolved = DSparkDraftSpec(spec)
        elif _looks_like_spec(spec):
            resolved = spec
        else:
            raise TypeError(f"spec must be a draft spec, a class or a 'module:Class' string, got {spec!r}")
        name = f"spec:{architecture}"
        with self._lock:
            if override:
                info = PluginInfo(name=name, distribution=None, version=None, value=None)
                self._overrides[architecture] = (info, resolved)
                self._report = None
                return
            self.register_plugin(_single_spec_plugin(architecture, resolved), name=name)

    def unregister(self, name: str) -> None:
        """Remove an in-process plugin registered under ``name``."""
        with self._lock:
            before = len(self._in_process)
            self._in_process = [(n, p) for n, p in self._in_process if n != name]
            if len(self._in_process) == before:
                raise KeyError(f"no in-process dspark plugin named {name!r}")
            self._report = None

    @contextmanager
    def isolated(self, *, autoload: bool | None = None) -> Iterator[DraftRegistry]:
        """A block whose in-process registrations (and overrides) are undone when it ends.

        ``autoload=False`` hides installed entry points inside it; ``None`` follows
        ``DSPARK_DISABLE_PLUGIN_AUTOLOAD``. Discovery is redone on entry and exit.
        """
        with self._lock:
            saved = (list(self._in_process), dict(self._overrides), self._autoload)
            self._autoload = autoload
            self.refresh()
        try:
            yield self
        finally:
            with self._lock:
                self._in_process, self._overrides, self._autoload = saved
                self.refresh()

    # -- Mapping -----------------------------------------------------------------------------

    def __getitem__(self, architecture: str) -> DraftSpec:
        entry = self.report().entries.get(architecture)
        if entry is None:
            raise KeyError(architecture)
        return entry.spec

    def __contains__(self, architecture: object) -> bool:
        return isinstance(architecture, str) and architecture in self.report().entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.report().entries))

    def __len__(self) -> int:
        return len(self.report().entries)

    def __setitem__(self, key: str, value: object) -> None:
        raise TypeError(
            "DSPARK_DRAFT_REGISTRY is read-only. Register a family with a 'dspark.drafts' entry point, "
            "or at run time with dspark_core.register_spec(architecture, spec) or register_plugin(module)."
        )

    def __delitem__(self, key: str) -> None:
        self.__setitem__(key, None)

    def __repr__(self) -> str:
        return f"<DraftRegistry {sorted(self)}>"

    # -- resolution --------------------------------------------------------------------------

    def resolve(self, architectures: Sequence[str]) -> DraftSpec:
        """The spec of the first architecture, in the caller's order, that a plugin provides."""
        return self.resolve_entry(architectures).spec

    def resolve_entry(self, architectures: Sequence[str]) -> ArchitectureEntry:
        """Like :meth:`resolve`, but returns the whole entry (which architecture, which plugin)."""
        names = _check_architectures(architectures)
        report = self.report()
        for name in names:
            entry = report.entries.get(name)
            if entry is not None:
                entry.spec  # noqa: B018 - raises the conflict error here rather than at the caller
                return entry
        raise DraftSpecNotFoundError(_not_found_message(names, report))


def _reset_in_child(owner: weakref.ReferenceType[DraftRegistry]) -> None:
    registry = owner()
    if registry is not None:
        registry._after_fork_in_child()


def _with_status(info: PluginInfo, status: PluginStatus = "failed") -> PluginInfo:
    return replace(info, status=status)


def _single_spec_plugin(architecture: str, spec: DraftSpec) -> object:
    @hookspecs.hookimpl
    def dspark_draft_specs() -> Mapping[str, DraftSpec]:
        return {architecture: spec}

    return SimpleNamespace(dspark_draft_specs=dspark_draft_specs)


def _check_architectures(architectures: object) -> list[str]:
    if isinstance(architectures, str | bytes):
        raise TypeError(
            f"architectures must be a sequence of names such as config.architectures, not a bare "
            f"string; did you mean [{architectures!r}]?"
        )
    if architectures is None or not isinstance(architectures, Iterable):
        raise TypeError(f"architectures must be a sequence of str, got {type(architectures).__name__}")
    names = list(architectures)
    if not names:
        raise ValueError("architectures is empty; the target config names no architecture")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"architectures must contain only str, got {type(name).__name__} {name!r}")
    return names


def _family_guess(architecture: str) -> str:
    stem = re.sub(r"(For[A-Z]\w*|Model|LMHeadModel)$", "", architecture)
    return re.sub(r"[^a-z0-9]+", "", stem.lower()) or "<family>"


def _not_found_message(names: list[str], report: DiscoveryReport) -> str:
    supported = sorted(a for a, entry in report.entries.items() if entry.status == "ok") or ["none"]
    lines = [
        f"no DSpark draft is registered for architectures {names}.",
        f"Supported architectures: {', '.join(supported)}.",
    ]
    conflicting = sorted(a for a, entry in report.entries.items() if entry.status == "conflict")
    if conflicting:
        lines.append(f"Registered but unresolvable (plugins conflict): {', '.join(conflicting)}.")
    if not report.autoload:
        lines.append(
            f"Installed plugins were not loaded ({ENV_NO_AUTOLOAD} is set, or the registry is isolated)."
        )
    lines.append(_missing_plugin_hint(names[0], report))
    return " ".join(lines)


def _missing_plugin_hint(architecture: str, report: DiscoveryReport) -> str:
    """Not installed, failed to load, or blocked: each has its own fix."""
    family = _family_guess(architecture)

    def likely(info: PluginInfo) -> bool:  # the plugin's names mention the family
        return family != "<family>" and family in _normalise(f"{info.name}-{info.distribution}").replace(
            "-", ""
        )

    failed = [f for f in report.failures if likely(f.plugin)]
    if failed:
        return (
            "Its plugin is installed but failed to load: " + "; ".join(str(f) for f in failed) + ". Fix it "
            "(`dspark list` shows every failure), then retry."
        )
    blocked = [p for p in report.plugins if p.status == "blocked" and likely(p)]
    if blocked:
        fixes = "; ".join(f"{p.label} by {p.blocked_by} ({_unblock(p)})" for p in blocked)
        return f"Its plugin is installed but blocked: {fixes}."
    parts = []
    if report.failures:
        failures = "; ".join(str(f) for f in report.failures)
        parts.append(f"Plugins that failed to load (one may provide it; fix it, then retry): {failures}.")
    others = [p for p in report.plugins if p.status == "blocked"]
    if others:
        parts.append(
            "Plugins blocked by selection: " + "; ".join(f"{p.label} ({_unblock(p)})" for p in others) + "."
        )
    install = (
        "install the family's plugin, usually `pip install dspark-<family>` "
        f"(e.g. `pip install dspark-{family}`), then retry."
    )
    parts.append(
        ("If none of them provides it, " if parts else "No installed plugin provides it: ") + install
    )
    return " ".join(parts)


def _unblock(info: PluginInfo) -> str:
    if info.blocked_by == ENV_DISABLE:
        return f"remove it from {ENV_DISABLE}"
    return f"add {info.distribution or info.name} to {ENV_ALLOW}"


DSPARK_DRAFT_REGISTRY = DraftRegistry()


def resolve_dspark_draft_spec(architectures: Sequence[str]) -> DraftSpec:
    """Return the draft spec for a target's ``config.architectures``.

    The first architecture, in the given order, that an installed plugin registers wins.
    Raises ``TypeError`` for a bare string, ``ValueError`` for an empty sequence,
    :class:`DraftSpecNotFoundError` (a ``ValueError``) when nothing matches and
    :class:`DraftSpecConflictError` when two distributions disagree on the winning architecture.
    """
    return DSPARK_DRAFT_REGISTRY.resolve(architectures)


def refresh() -> None:
    """Rescan installed plugins, e.g. after a ``pip install`` in a running session."""
    DSPARK_DRAFT_REGISTRY.refresh()


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> str:
    """Register a plugin module or object in-process (see :meth:`DraftRegistry.register_plugin`)."""
    return DSPARK_DRAFT_REGISTRY.register_plugin(plugin, name)


def register_spec(architecture: str, spec: DraftSpec | type[Any] | str, *, override: bool = False) -> None:
    """Register one architecture in-process (see :meth:`DraftRegistry.register_spec`)."""
    DSPARK_DRAFT_REGISTRY.register_spec(architecture, spec, override=override)
