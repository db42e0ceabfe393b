"""The checks behind ``dspark doctor``, a plugin author's CI gate.

For every registered architecture: the draft class imports and is a ``PreTrainedModel`` with a
``config_class`` (without one only ``from_pretrained`` fails, long after training); and, where a
plugin's ``dspark_tiny_target_builders`` hook builds a tiny target of that architecture, a tiny
draft is built for it and runs one training forward and one ``propose`` on the target's real
features, then a batched greedy speculative decode on the tiny target and, where its config has a
sliding window, on a variant with a window shorter than the decode (a first full layer and sliding
ones after it, where the config can say so), so a target whose cache cannot be cut back fails here
rather than in ``generate``. No family registered at all is a problem too: a misspelt entry-point group would
otherwise pass. Torch is imported only when a check needs it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dspark_core.hookspecs import ENTRY_POINT_GROUP
from dspark_core.registry import ENV_NO_AUTOLOAD, ArchitectureEntry, DiscoveryReport

#: The tiny target every family's builder is asked for (its last id is the tiny draft's mask token).
TINY_TARGET_SIZES: dict[str, int] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
}
#: The tiny draft: as small as the method allows, reading both target layers.
TINY_DRAFT_OPTIONS: dict[str, Any] = {
    "num_draft_layers": 1,
    "block_size": 4,
    "target_layer_ids": [0, 1],
    "num_anchors": 2,
}
#: Tokens of the tiny forward: four blocks' worth.
TINY_SEQUENCE_LENGTH = 16
#: The sliding window of the tiny target's windowed variant, far shorter than the tiny decode.
TINY_WINDOW = 4
#: Prompt lengths (ragged, so the batch is too) and new tokens of the tiny speculative decode.
TINY_DECODE_PROMPTS = (6, 3)
TINY_DECODE_TOKENS = 16


@dataclass
class DoctorResult:
    """One line per architecture that passed, and one per problem."""

    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _CheckFailed(Exception):
    """A check step failed; the message is the problem line."""


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def check_report(report: DiscoveryReport) -> DoctorResult:
    """Run every check on what discovery found; each problem is one line."""
    result = DoctorResult(problems=[str(failure) for failure in report.failures])
    if not report.entries:
        result.problems.append(no_family_message(report))
        return result
    targets, builder_problems = tiny_targets(report)
    result.problems.extend(builder_problems)
    for entry in report.entries.values():
        try:
            result.ok.append(check_entry(entry, targets.get(entry.architecture)))
        except _CheckFailed as problem:
            result.problems.append(str(problem))
    result.problems = [" ".join(problem.split()) for problem in result.problems]
    return result


def no_family_message(report: DiscoveryReport) -> str:
    """Why nothing is registered, naming the entry-point group a plugin must use."""
    message = (
        f"no dspark family is registered: no installed distribution has a loadable {ENTRY_POINT_GROUP!r} "
        f'entry point. Declare it in pyproject.toml under [project.entry-points."{ENTRY_POINT_GROUP}"] '
        "(check the group's spelling), then pip install the plugin"
    )
    blocked = [f"{p.label} by {p.blocked_by}" for p in report.plugins if p.status == "blocked"]
    if blocked:
        message += f"; blocked by selection: {', '.join(blocked)}"
    if not report.autoload:
        message += f"; entry points were not loaded ({ENV_NO_AUTOLOAD} is set)"
    return message


def check_entry(entry: ArchitectureEntry, tiny_target: tuple[str, Any] | None = None) -> str:
    """The ok line for one architecture; raises ``_CheckFailed`` with the first problem found.

    ``tiny_target`` is ``(family, target)`` from :func:`tiny_targets`, when a builder makes one.
    """
    architecture = entry.architecture
    if entry.status == "conflict":
        raise _CheckFailed(entry.conflict_message())
    origin = entry.plugin.label
    try:
        cls = entry.spec.draft_cls
    except Exception as exc:
        raise _CheckFailed(f"{architecture}: {_one_line(exc)}") from exc
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise _CheckFailed(
            f"{architecture}: draft class {cls!r} from {origin} is not a "
            "transformers.PreTrainedModel subclass"
        )
    config_class = _check_config_class(architecture, cls, origin)
    note = _check_tiny_draft(entry, config_class, tiny_target)
    name, config_name = f"{cls.__module__}.{cls.__qualname__}", config_class.__name__
    return f"{architecture} -> {name} ({origin}); config_class {config_name}; {note}"


def _check_config_class(architecture: str, cls: type[Any], origin: str) -> type[Any]:
    from transformers import PretrainedConfig

    config_class = getattr(cls, "config_class", None)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if config_class is None:
        raise _CheckFailed(
            f"{architecture}: draft class {name} from {origin} has no config_class; set `config_class = "
            "<the draft's config class>` on it (e.g. Qwen3Config), or from_pretrained cannot load a "
            "saved draft"
        )
    if not (isinstance(config_class, type) and issubclass(config_class, PretrainedConfig)):
        raise _CheckFailed(
            f"{architecture}: draft class {name} from {origin} has config_class {config_class!r}, which is "
            "not a transformers.PretrainedConfig subclass"
        )
    return config_class


def tiny_targets(report: DiscoveryReport) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """``{architecture: (family, tiny target)}`` from every plugin's tiny-target builders, and the
    builders that failed. A target counts for each architecture its config names."""
    targets: dict[str, tuple[str, Any]] = {}
    builders, problems = _builders(report)
    for family, reference in builders.items():
        try:
            target = _build_tiny_target(reference)
        except Exception as exc:
            problems.append(
                f"tiny-target builder of family {family!r} ({reference!r}) failed: {_one_line(exc)}"
            )
            continue
        for architecture in getattr(target.config, "architectures", None) or []:
            targets.setdefault(str(architecture), (family, target))
    return targets, problems


def _builders(report: DiscoveryReport) -> tuple[dict[str, Any], list[str]]:
    # The hook `dspark make-tiny-target` reads, but from this report's plugin manager: in strict
    # mode a fresh lookup would raise on the very failures this command reports.
    found: dict[str, Any] = {}
    problems: list[str] = []
    hook = report.manager.hook.dspark_tiny_target_builders if report.manager is not None else None
    for impl in hook.get_hookimpls() if hook is not None else []:
        try:
            returned: Any = impl.function()
            answer = dict(returned or {})
        except Exception as exc:
            problems.append(
                f"plugin {impl.plugin_name!r}: dspark_tiny_target_builders failed: {_one_line(exc)}"
            )
            continue
        for family, builder in answer.items():
            found.setdefault(str(family), builder)
    return found, problems


def _build_tiny_target(reference: Any) -> Any:
    import torch

    from dspark_core.targets.builders import TinyTargetShape

    builder = reference
    if isinstance(reference, str):
        module_name, _, attribute = reference.partition(":")
        builder = getattr(importlib.import_module(module_name), attribute)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return builder(TinyTargetShape(**TINY_TARGET_SIZES)).eval()


def _check_tiny_draft(
    entry: ArchitectureEntry, config_class: type[Any], tiny_target: tuple[str, Any] | None
) -> str:
    if tiny_target is None:
        return "no plugin builds a tiny target of it (dspark_tiny_target_builders), so no test forward"
    family, target = tiny_target
    architecture = entry.architecture
    draft = _step(
        architecture,
        f"building a tiny draft for family {family!r}'s tiny target",
        lambda: _tiny_draft(entry, config_class, target),
    )
    _step(architecture, "the tiny draft's forward and propose", lambda: _forward_and_propose(target, draft))
    decoded = [_step(architecture, "a tiny speculative decode", lambda: _speculative_decode(target, draft))]
    windowed = _step(
        architecture,
        "building a sliding-window variant of the tiny target",
        lambda: _windowed_variant(target),
    )
    if windowed is not None:
        decoded.append(
            _step(
                architecture,
                f"a tiny speculative decode past a sliding window of {TINY_WINDOW}",
                lambda: _speculative_decode(windowed, draft),
            )
        )
    decodes = "; ".join(decoded)
    return f"tiny draft for family {family!r}: forward and propose ok; speculative decode ok ({decodes})"


def _step(architecture: str, what: str, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except _CheckFailed as problem:
        raise _CheckFailed(f"{architecture}: {what}: {problem}") from problem
    except Exception as exc:
        raise _CheckFailed(f"{architecture}: {what} failed: {_one_line(exc)}") from exc


def _tiny_draft(entry: ArchitectureEntry, config_class: type[Any], target: Any) -> Any:
    import torch

    from dspark_core.modeling.draft_config import TargetLayerWarning

    build_draft = getattr(entry.spec, "build_draft", None)
    if not callable(build_draft):
        raise _CheckFailed(
            f"its spec {entry.reference} has no build_draft(target, **options) (see TrainableDraftSpec), "
            "so `dspark train` cannot build a draft either"
        )
    mask_token_id = int(target.config.vocab_size) - 1
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", TargetLayerWarning)  # layer n-1 is read on purpose; never served
        torch.manual_seed(0)
        draft = build_draft(target, mask_token_id=mask_token_id, **TINY_DRAFT_OPTIONS)
    if not isinstance(draft.config, config_class):
        raise _CheckFailed(
            f"the draft's config is a {type(draft.config).__name__}, but config_class is "
            f"{config_class.__name__}: a saved draft would load with a different config class"
        )
    return draft.eval()


def _forward_and_propose(target: Any, draft: Any) -> None:
    import torch

    from dspark_core.modeling.features import capture_target_features

    if not (callable(getattr(draft, "propose", None)) and callable(getattr(draft, "new_cache", None))):
        raise _CheckFailed(
            "the draft has no propose()/new_cache(), so it cannot decode; subclass DSparkDraftModel"
        )
    config = draft.config
    vocab, block = int(config.vocab_size), int(config.block_size)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab - 1, (1, TINY_SEQUENCE_LENGTH), generator=generator)
    features = capture_target_features(target, input_ids, list(config.target_layer_ids))
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    with torch.no_grad():
        output = draft(input_ids, features.features, features.final_hidden, loss_mask, generator=generator)
    states = getattr(output, "hidden", None)
    if not isinstance(states, torch.Tensor) or not bool(torch.isfinite(states).all()):
        raise _CheckFailed("the training forward gave no finite `hidden` states")
    cache = draft.new_cache()
    tokens = draft.propose(input_ids[:, -1], features.features, cache).tokens
    if tuple(tokens.shape) != (1, block) or int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise _CheckFailed(
            f"propose returned tokens of shape {tuple(tokens.shape)} in [{int(tokens.min())}, "
            f"{int(tokens.max())}], expected shape (1, {block}) in [0, {vocab})"
        )
    if cache.length < TINY_SEQUENCE_LENGTH:
        raise _CheckFailed(
            f"after propose the draft cache holds {cache.length} context rows, not "
            f"{TINY_SEQUENCE_LENGTH}: every layer must extend the cache with the context keys/values"
        )


def _windowed_variant(target: Any) -> Any:
    """The tiny target with a short sliding window (same weights), or ``None`` if its config has none."""
    import torch

    config = target.config
    if not hasattr(config, "sliding_window"):
        return None
    values = config.to_dict()
    values.pop("layer_types", None)  # re-derived from the window settings below
    values["sliding_window"] = TINY_WINDOW
    if "use_sliding_window" in values:
        values["use_sliding_window"] = True
    if "max_window_layers" in values:
        values["max_window_layers"] = 1  # layer 0 full, the others sliding: a hybrid target
    windowed_config = type(config)(**values)
    if getattr(windowed_config, "sliding_window", None) != TINY_WINDOW:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        windowed = type(target)(windowed_config).eval()
    windowed.load_state_dict(target.state_dict())
    return windowed


def _speculative_decode(target: Any, draft: Any) -> str:
    """A ragged batch decoded greedily; each token must be the target's argmax given the tokens before
    it, as an uncached forward of the whole sequence sees it. Returns what kind of target it was."""
    import torch

    from dspark_core.decoding.batched import speculative_generate_batch
    from dspark_core.decoding.ragged_cache import SLIDING, target_layer_types

    layer_types, window = target_layer_types(target)
    vocab = int(draft.config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab - 1, (length,), generator=generator) for length in TINY_DECODE_PROMPTS]
    results = speculative_generate_batch(
        target, draft, prompts, max_new_tokens=TINY_DECODE_TOKENS, eos_token_id=[]
    )
    for row, result in enumerate(results):
        sequence = result.sequences.to(next(target.parameters()).device)
        if sequence.shape[1] != len(prompts[row]) + TINY_DECODE_TOKENS:
            raise _CheckFailed(f"row {row} decoded {sequence.shape[1] - len(prompts[row])} tokens, not 16")
        with torch.no_grad():
            logits = target(sequence).logits[0, len(prompts[row]) - 1 : -1].float()
        chosen = logits.gather(1, sequence[0, len(prompts[row]) :].unsqueeze(1)).squeeze(1)
        gap = logits.max(dim=1).values - chosen
        # Float noise between cached and uncached forwards is ~1e-6; a wrong cache is far off.
        bad = (gap > 1e-4 * logits.abs().max()).nonzero()
        if bad.numel():
            position = int(bad[0, 0])
            raise _CheckFailed(
                f"row {row}, new token {position}: the decode chose a token {float(gap[position]):.3g} "
                "below the target's argmax (the target cache was not cut back correctly)"
            )
    if SLIDING not in layer_types:
        return "full attention"
    kind = "hybrid" if len(set(layer_types)) > 1 else "every layer"
    return f"sliding window {window}, {kind}"
