"""How to build a DSpark draft model for one target architecture."""

from __future__ import annotations

import importlib
import re
import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from dspark_core.errors import DraftClassImportError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@runtime_checkable
class DraftSpec(Protocol):
    """How to build a DSpark draft model for a particular target architecture."""

    @property
    def draft_cls(self) -> type[PreTrainedModel]:
        """The draft model class, a ``transformers.PreTrainedModel`` subclass."""
        ...


@runtime_checkable
class TrainableDraftSpec(DraftSpec, Protocol):
    """A spec that can also build a draft config and a draft from a target, as training needs."""

    def build_draft_config(self, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        """Derive a validated draft config from the target's config."""
        ...

    def build_draft(self, target: PreTrainedModel, **options: Any) -> PreTrainedModel:
        """Build a draft for ``target`` with its embeddings and ``lm_head`` copied and frozen."""
        ...


class DSparkDraftSpec:
    """The spec plugins ship: a draft class, given directly or as a lazy ``"module:Class"`` string.

    A string reference is imported on the first access of :attr:`draft_cls`, once, under a lock, so
    that listing and resolving plugins never imports model code. Specs are immutable and compare
    by the class they name, so two plugins naming the same class do not conflict.

    Draft classes built on :class:`dspark_core.modeling.draft.DSparkDraftModel` provide
    ``config_from_target`` and ``from_target``, which :meth:`build_draft_config` and
    :meth:`build_draft` call.
    """

    __slots__ = ("_cls", "_lock", "_reference", "provider")

    _reference: str
    _cls: type[Any] | None
    _lock: threading.Lock
    provider: str | None

    def __init__(self, draft_cls: type[Any] | str, *, provider: str | None = None) -> None:
        if isinstance(draft_cls, str):
            if not _REFERENCE.match(draft_cls):
                raise ValueError(
                    f"draft class reference {draft_cls!r} is malformed: write it as "
                    "'package.module:ClassName'"
                )
            reference, cls = draft_cls, None
        elif isinstance(draft_cls, type):
            reference, cls = f"{draft_cls.__module__}:{draft_cls.__qualname__}", draft_cls
        else:
            raise TypeError(
                "DSparkDraftSpec takes a draft class or a 'package.module:ClassName' string, "
                f"got {type(draft_cls).__name__}"
            )
        object.__setattr__(self, "_reference", reference)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "provider", provider)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"DSparkDraftSpec is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"DSparkDraftSpec is immutable; cannot delete {name!r}")

    @property
    def reference(self) -> str:
        """The ``"module:Class"`` reference of the draft class."""
        return self._reference

    @property
    def draft_cls(self) -> type[PreTrainedModel]:
        """The draft class, imported on first access."""
        cls = self._cls
        if cls is None:
            with self._lock:
                cls = self._cls
                if cls is None:
                    cls = self._import()
                    object.__setattr__(self, "_cls", cls)
        return cls

    def _import(self) -> type[Any]:
        module_name, _, qualname = self._reference.partition(":")
        origin = f" (provided by {self.provider})" if self.provider else ""
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise DraftClassImportError(
                f"cannot import draft class {self._reference!r}{origin}: {type(exc).__name__}: {exc}. "
                "Check that the providing distribution and its dependencies are installed."
            ) from exc
        if not isinstance(obj, type):
            raise DraftClassImportError(
                f"draft class reference {self._reference!r}{origin} names a {type(obj).__name__}, not a class"
            )
        return obj

    def with_provider(self, provider: str) -> DSparkDraftSpec:
        """A copy that records which plugin provided it, for error messages."""
        copy = DSparkDraftSpec(self._cls if self._cls is not None else self._reference, provider=provider)
        return copy

    def build_draft_config(self, target_config: PretrainedConfig, **options: Any) -> PretrainedConfig:
        """Derive a validated draft config from ``target_config`` (see the draft class)."""
        builder = getattr(self.draft_cls, "config_from_target", None)
        if builder is None:
            raise TypeError(f"draft class {self._reference!r} has no config_from_target classmethod")
        config: PretrainedConfig = builder(target_config, **options)
        return config

    def build_draft(self, target: PreTrainedModel, **options: Any) -> PreTrainedModel:
        """Build a draft for ``target``, copying and freezing its embeddings and ``lm_head``."""
        builder = getattr(self.draft_cls, "from_target", None)
        if builder is None:
            raise TypeError(f"draft class {self._reference!r} has no from_target classmethod")
        draft: PreTrainedModel = builder(target, **options)
        return draft

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DSparkDraftSpec):
            return NotImplemented
        return self._reference == other._reference

    def __hash__(self) -> int:
        return hash(("DSparkDraftSpec", self._reference))

    def __repr__(self) -> str:
        return f"DSparkDraftSpec({self._reference!r})"


def spec_reference(spec: DraftSpec) -> str:
    """The ``"module:Class"`` a spec names, without importing it (any :class:`DraftSpec`)."""
    if isinstance(spec, DSparkDraftSpec):
        return spec.reference
    return f"{type(spec).__module__}:{type(spec).__qualname__}"
