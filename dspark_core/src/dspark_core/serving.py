"""Which loaders can load a saved DSpark draft: the engines' rules per release, and the check over them.

Each :class:`Engine` is one engine's loader for one family of drafts (the draft classes in
``architectures``), over a supported range of releases. Its :class:`Rule` s were read from the
engine's released source (PyPI wheels for vLLM and SGLang, the ``main`` branch for DeepSpec); each
cites the release, file and line it was read from, and applies to the releases in ``[since,
until]``; a reading that changed between releases is two rules of the same name. A rule that no
released source decides says why in ``unverified``. :func:`check_draft` applies, per engine, the
rules of the release asked for (the newest by default) to the facts of one draft (its
``config.json`` and, when known, its checkpoint's tensor names and shapes). ``dspark check-draft``
prints that with the serving flags (:mod:`dspark_core.serving_flags`), and ``dspark train`` runs it
on the draft config before the first step.

NeMo AutoModel is not a loader: 0.7.0 trains DSpark drafts and resumes its own training
checkpoints (``recipes/llm/train_dspark.py``), but has no path that loads a saved draft directory
for decoding or serving.

Torch-free: only the standard library and :mod:`dspark_core.modeling.draft_config` (itself torch-free).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dspark_core.errors import DraftConfigError
from dspark_core.modeling.draft_config import validate_dspark_config

__all__ = [
    "ENGINES",
    "NEMO_NOTE",
    "DraftFacts",
    "Engine",
    "Release",
    "Rule",
    "RuleResult",
    "Verdict",
    "check_draft",
    "draft_facts",
    "engine_release",
    "engine_rule",
    "read_draft_dir",
    "serving_summary",
]

TARGET_WEIGHT_KEYS = ("embed_tokens.weight", "lm_head.weight")

#: The config keys DeepSpec's Qwen3DSparkModel asserts present (markov_head_type only when
#: markov_rank > 0, confidence_head_with_markov only with the confidence head).
DEEPSPEC_CONFIG_KEYS = (
    "target_layer_ids",
    "mask_token_id",
    "num_anchors",
    "enable_confidence_head",
    "markov_rank",
    "markov_head_type",
    "confidence_head_with_markov",
)

NEMO_NOTE = (
    "NeMo AutoModel has no loader for a saved DSpark draft: 0.7.0 trains drafts and resumes its own "
    "training checkpoints (nemo_automodel/recipes/llm/train_dspark.py:1441) but never loads a draft "
    "directory for decoding or serving"
)


# -- releases -----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Release:
    """A release number (``0.25``, ``0.5.23``) or a branch name (``main``, ordered after numbers)."""

    parts: tuple[int, ...]
    branch: str = ""

    @classmethod
    def parse(cls, text: str) -> Release:
        text = text.strip()
        if text and not text[0].isdigit():
            return cls((), text)
        try:
            return cls(tuple(int(part) for part in text.split(".")))
        except ValueError:
            raise DraftConfigError(f"{text!r} is not a release number such as 0.25 or 0.5.23") from None

    def within(self, since: Release | None, until: Release | None) -> bool:
        """Whether this release lies in ``[since, until]``, compared at each bound's precision."""
        if self.branch or (since is not None and since.branch) or (until is not None and until.branch):
            return all(bound is None or bound == self for bound in (since, until))
        if since is not None and self.parts[: len(since.parts)] < since.parts:
            return False
        return until is None or self.parts[: len(until.parts)] <= until.parts

    def __str__(self) -> str:
        return self.branch or ".".join(str(part) for part in self.parts)


# -- facts, rules, engines, verdicts ------------------------------------------------------------------


@dataclass(frozen=True)
class DraftFacts:
    """What the rules look at, read from a draft's config (and checkpoint, when there is one)."""

    config: Mapping[str, Any]
    #: tensor names of the saved checkpoint; None when only the config is known (training)
    tensor_names: frozenset[str] | None = None
    #: tensor shapes, when the checkpoint's headers were read
    tensor_shapes: Mapping[str, tuple[int, ...]] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        return self.config.get(name, default)

    @property
    def markov_rank(self) -> int:
        return int(self.get("markov_rank", 0) or 0)

    @property
    def confidence_head(self) -> bool:
        return bool(self.get("enable_confidence_head", False))

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.get("target_layer_ids") or []]

    @property
    def last_layer(self) -> int:
        return int(self.get("num_target_layers", 0) or 0) - 1

    @property
    def architectures(self) -> list[str]:
        value = self.get("architectures") or []
        return [value] if isinstance(value, str) else [str(name) for name in value]

    @property
    def draft_vocab_size(self) -> int | None:
        """K of a reduced-vocabulary draft (``draft_vocab_size < vocab_size``), else None."""
        size, vocab = self.get("draft_vocab_size"), self.get("vocab_size")
        if isinstance(size, int) and isinstance(vocab, int) and size < vocab:
            return size
        return None


@dataclass(frozen=True)
class Rule:
    """One reading of an engine's draft loader.

    ``name`` is what it decides (stable across releases), ``kind`` its check in :data:`CHECKS`
    with ``value`` the check's argument, ``says`` what the engine does, ``citation`` the release,
    file and line it was read from, ``since``/``until`` the releases it holds for (None: the
    engine's whole range), and ``unverified`` why no released source decides it ("" when one does).
    """

    name: str
    kind: str
    value: Any
    says: str
    citation: str
    since: str | None = None
    until: str | None = None
    unverified: str = ""

    def holds_for(self, release: Release) -> bool:
        since = Release.parse(self.since) if self.since else None
        until = Release.parse(self.until) if self.until else None
        return release.within(since, until)


@dataclass(frozen=True)
class Engine:
    """One engine's loader for the draft classes in ``architectures``, over ``releases``."""

    name: str
    #: the spelling of ``--engine-version KEY=RELEASE`` and ``--require KEY``
    key: str
    #: the oldest and newest supported release (one entry for a branch)
    releases: tuple[str, ...]
    #: what was read: the wheels or the commit
    source: str
    architectures: tuple[str, ...]
    #: how the engine finds the draft class; its ``value`` is ``(accepted names, first only)``
    dispatch: Rule
    rules: tuple[Rule, ...]

    @property
    def newest(self) -> str:
        return self.releases[-1]

    def supports(self, release: Release) -> bool:
        oldest, newest = (Release.parse(r) for r in (self.releases[0], self.releases[-1]))
        return release.within(oldest, newest)

    def rules_for(self, release: Release) -> list[Rule]:
        return [rule for rule in self.rules if rule.holds_for(release)]


@dataclass(frozen=True)
class RuleResult:
    """One rule applied to one draft: ``ok``, and ``detail`` (the draft's fact: what the engine does)."""

    rule: str
    ok: bool
    detail: str
    citation: str
    verified: bool = True
    #: True for a rule that only says how the engine uses the draft (it never refuses one)
    informational: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "ok": self.ok,
            "verified": self.verified,
            "detail": self.detail,
            "citation": self.citation,
        }


@dataclass
class Verdict:
    engine: str
    version: str
    ok: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[RuleResult] = field(default_factory=list)
    #: the engine's key for ``--require`` and ``--engine-version`` ("dspark" for this library)
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.version,
            "ok": self.ok,
            "reasons": self.reasons,
            "notes": self.notes,
            "rules": [result.to_dict() for result in self.results],
        }


# -- the checks: each returns (ok, the draft's fact), or None where the rule does not apply ------------

Outcome = tuple[bool, str] | None


def _config_keys(facts: DraftFacts, names: Sequence[str]) -> Outcome:
    wanted = [
        name
        for name in names
        if not (name == "markov_head_type" and facts.markov_rank == 0)
        and not (name == "confidence_head_with_markov" and not facts.confidence_head)
    ]
    missing = [name for name in wanted if name not in facts.config]
    if missing:
        return False, f"config.json lacks {', '.join(missing)}"
    return True, f"config.json has {', '.join(wanted)}"


def _markov_head_types(facts: DraftFacts, accepted: Sequence[str]) -> Outcome:
    if facts.markov_rank == 0:
        return None
    head = str(facts.get("markov_head_type", "vanilla"))
    return head in accepted, f"markov_head_type {head!r}"


def _markov_rank_zero(facts: DraftFacts, accepted: bool) -> Outcome:
    if facts.markov_rank > 0:
        return None
    return accepted, "markov_rank 0"


def _confidence_head(facts: DraftFacts, _: Any) -> Outcome:
    if not facts.confidence_head:
        return True, "no confidence head"
    features = "with" if facts.get("confidence_head_with_markov", False) else "without"
    return True, f"a confidence head {features} Markov features"


def _embedding_layer(facts: DraftFacts, accepted: bool) -> Outcome:
    if -1 not in facts.layer_ids:
        return None
    return accepted, "target_layer_ids contains -1 (the embedding output)"


def _last_layer(facts: DraftFacts, accepted: bool) -> Outcome:
    last = facts.last_layer
    if last < 0 or last not in facts.layer_ids:
        return None
    return accepted, f"target_layer_ids contains {last} = n-1, the target's last layer"


def _target_weights(facts: DraftFacts, required: bool) -> Outcome:
    if facts.tensor_names is None:
        return None
    absent = [key for key in TARGET_WEIGHT_KEYS if key not in facts.tensor_names]
    if not absent:
        return True, "the checkpoint has embed_tokens and lm_head"
    return not required, f"the checkpoint has no {' or '.join(absent)} (saved without the target's weights)"


def _reduced_vocabulary(facts: DraftFacts, served: bool) -> Outcome:
    size = facts.draft_vocab_size
    if size is None:
        return None
    fact = f"draft_vocab_size {size} < vocab_size {facts.get('vocab_size')}"
    if not served:
        return False, fact
    if facts.tensor_names is None:
        return True, f"{fact} (the checkpoint must carry lm_head.weight [{size}, H] and d2t [{size}])"
    rank = facts.markov_rank
    wanted = {"lm_head.weight": size, "d2t": size} | ({"markov_head.markov_w2.weight": size} if rank else {})
    shapes = facts.tensor_shapes or {}
    wrong = [
        f"{name} {list(shapes[name]) if name in shapes else 'absent'}"
        for name, rows in wanted.items()
        if name not in facts.tensor_names or (name in shapes and shapes[name][0] != rows)
    ]
    if wrong:
        return False, f"{fact}, but the checkpoint's {', '.join(wrong)} do not have {size} rows"
    return True, f"{fact}, with lm_head, d2t{' and markov_w2' if rank else ''} of {size} rows"


def _block_size(facts: DraftFacts, _: Any) -> Outcome:
    return True, f"block_size {facts.get('block_size')}"


#: Rule kind -> check. A rule's ``value`` is the check's second argument.
CHECKS: dict[str, Callable[[DraftFacts, Any], Outcome]] = {
    "config_keys": _config_keys,
    "markov_head_types": _markov_head_types,
    "markov_rank_zero": _markov_rank_zero,
    "confidence_head": _confidence_head,
    "embedding_layer": _embedding_layer,
    "last_layer": _last_layer,
    "target_weights": _target_weights,
    "reduced_vocabulary": _reduced_vocabulary,
    "block_size": _block_size,
}
#: Kinds that say how an engine uses a draft and never refuse one (printed as notes).
INFORMATIONAL = frozenset({"confidence_head", "block_size", "logit_softcap"})


# -- the engines' rules (Qwen3 drafts) ------------------------------------------------------------------
# Read from the released sources: vLLM wheels 0.25.0 to 0.34.0 and SGLang wheels 0.5.16 to 0.5.23
# (every release in between was read where a rule could change), DeepSpec main at afdfa7c9.
# Paths are inside each wheel or repository; a citation names the first release of the rule's range
# with its lines, and the last release's lines where they moved.

_DS = "DeepSpec main @afdfa7c9"
_DS_MODEL = f"{_DS} deepspec/modeling/dspark/qwen3/modeling.py"
_DS_MARKOV = f"{_DS} deepspec/modeling/dspark/markov_head.py"

# Rules of DeepSpec's shared modules, so every DeepSpec family's block states them once.
_DEEPSPEC_MARKOV_HEAD_TYPES = Rule(
    "markov-head-types",
    "markov_head_types",
    ("vanilla", "gated", "rnn"),
    "build_markov_head builds vanilla, gated and rnn heads",
    f"{_DS_MARKOV}:287-311",
)
_DEEPSPEC_EMBEDDING_LAYER = Rule(
    "embedding-layer",
    "embedding_layer",
    True,
    "id -1 reads hidden_states[0], the embedding output",
    f"{_DS} deepspec/modeling/dspark/common.py:52-56",
)

DEEPSPEC = Engine(
    name="DeepSpec",
    key="deepspec",
    releases=("main",),
    source="deepseek-ai/DeepSpec main @afdfa7c9 (2026-06-30)",
    architectures=("Qwen3DSparkModel",),
    dispatch=Rule(
        "architectures",
        "architectures",
        (("Qwen3DSparkModel", "Gemma4DSparkModel"), True),
        "eval.py picks the evaluator by config.architectures[0] alone",
        f"{_DS} eval.py:10-16,54",
    ),
    rules=(
        Rule(
            "config-keys",
            "config_keys",
            DEEPSPEC_CONFIG_KEYS,
            "Qwen3DSparkModel asserts each key is present, with no default",
            f"{_DS_MODEL}:207-224",
        ),
        _DEEPSPEC_MARKOV_HEAD_TYPES,
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            True,
            "build_markov_head returns no head, and sampling uses the base logits",
            f"{_DS_MARKOV}:290-291; {_DS_MODEL}:326-327",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            None,
            "loads a confidence head with or without Markov features, as confidence_head_with_markov says",
            f"{_DS_MODEL}:255-267",
        ),
        _DEEPSPEC_EMBEDDING_LAYER,
        Rule(
            "last-layer",
            "last_layer",
            False,
            "the evaluator asserts the final target layer is no feature layer (HF gives it after the "
            "final norm)",
            f"{_DS} deepspec/eval/base_evaluator.py:100-112, deepspec/eval/dspark/evaluator.py:80",
        ),
        Rule(
            "target-weights",
            "target_weights",
            True,
            "the evaluator loads the draft alone and embeds and projects with the draft's own "
            "embed_tokens and lm_head",
            f"{_DS} deepspec/eval/dspark/evaluator.py:75-79, deepspec/eval/dspark/draft_ops.py:37,107",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            False,
            "lm_head is built [vocab_size, hidden], so a [draft_vocab_size, hidden] lm_head and d2t "
            "do not load",
            f"{_DS_MODEL}:246",
        ),
        Rule(
            "block-size",
            "block_size",
            None,
            "proposes block_size tokens per round (max_proposal_tokens = block_size)",
            f"{_DS} deepspec/eval/dspark/evaluator.py:40-42",
        ),
    ),
)

_V25 = "vllm 0.25.0 vllm"
_V34 = "vllm 0.34.0 vllm"
_V_MODEL = "model_executor/models/qwen3_dspark.py"
_V_SPEC = "v1/worker/gpu/spec_decode"
_RECEIVES = (
    "the draft vocabulary is served: lm_head [K, H], markov_w2 [K, r] and d2t [K] load from the checkpoint"
)
#: Why a loader that builds a rank-0 Markov head and loads the draft is still unverified for r = 0.
_ZERO_WIDTH = (
    "no released source refuses r = 0, but whether the speculator runs a zero-width Markov projection "
    "is decided only at run time, which needs a GPU and the engine"
)

VLLM = Engine(
    name="vLLM",
    key="vllm",
    releases=("0.25", "0.34"),
    source="vllm wheels 0.25.0 to 0.34.0 from PyPI (0.24 has no DSpark files)",
    architectures=("Qwen3DSparkModel",),
    dispatch=Rule(
        "architectures",
        "architectures",
        (("Qwen3DSparkModel",), False),
        "method 'dspark' loads a Qwen3 draft only when config.architectures contains "
        "Qwen3DSparkModel; any other name is taken for a DeepSeek-V4 draft",
        f"{_V25}/config/speculative.py:899-908, model_executor/models/registry.py:597 (0.33.0: "
        "speculative.py:1543-1552); vllm 0.34.0 registry.py:711, "
        f"{_V_SPEC}/dspark/config.py:56-68",
    ),
    rules=(
        Rule(
            "config-keys",
            "config_keys",
            ("mask_token_id", "target_layer_ids", "markov_rank"),
            "mask_token_id is required, target_layer_ids sets the captured layers and markov_rank is "
            "read without a default (block_size is not required)",
            f"{_V25}/{_V_SPEC}/utils.py:55-77, {_V_SPEC}/eagle/eagle3_utils.py:52-55, {_V_MODEL}:90 "
            f"(0.34.0: utils.py:141-163, eagle3_utils.py:127-130, {_V_MODEL}:213)",
        ),
        Rule(
            "markov-head-types",
            "markov_head_types",
            ("vanilla",),
            "DSparkMarkovHead has only markov_w1 and markov_w2; the weight loader raises on a gated or "
            "rnn head's extra weights",
            f"{_V25}/{_V_MODEL}:36-58, model_executor/models/utils.py:387 (0.34.0: {_V_MODEL}:49-82, "
            "utils.py:454)",
        ),
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            True,
            "the loader builds a rank-0 Markov head without a check, and its load_weights returns no "
            "names, so no missing-weight check runs",
            f"{_V25}/{_V_MODEL}:84-92,150-186 (0.34.0: {_V_MODEL}:207-219,321-359)",
            unverified=_ZERO_WIDTH,
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "ignored",
            "the loader skips confidence_head weights (not wired into inference)",
            f"{_V25}/{_V_MODEL}:173-176 (0.27.0: {_V_MODEL}:181-184)",
            until="0.27",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "adaptive-required",
            "builds the head when enable_confidence_head and uses it only with "
            "enable_adaptive_verification, which raises for a draft without one",
            f"vllm 0.28.0 vllm/{_V_MODEL}:159-170, {_V_SPEC}/dspark/speculator.py:111-117 (0.29.0: the "
            "same lines)",
            since="0.28",
            until="0.29",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "adaptive",
            "builds the head when enable_confidence_head and uses it only with enable_adaptive_verification",
            f"vllm 0.30.0 vllm/{_V_SPEC}/dspark/speculator.py:106-109 (0.34.0: {_V_MODEL}:220-231, "
            "speculator.py:177-180)",
            since="0.30",
        ),
        Rule(
            "embedding-layer",
            "embedding_layer",
            True,
            "id -1 becomes aux layer 0, captured before the first decoder layer: the embedding output",
            f"{_V25}/model_executor/models/qwen2.py:415, {_V_SPEC}/eagle/eagle3_utils.py:55 (0.34.0: "
            "qwen2.py:420-423, eagle3_utils.py:130)",
        ),
        Rule(
            "last-layer",
            "last_layer",
            False,
            "layer n-1 is captured before the final norm, while dspark and DeepSpec train on HF's "
            "final-normed hidden_states[n]: the features differ",
            f"{_V25}/model_executor/models/qwen2.py:419-429 (0.34.0: qwen2.py:424-442)",
        ),
        Rule(
            "target-weights",
            "target_weights",
            False,
            "a checkpoint without embed_tokens or lm_head gets the target's",
            f"{_V25}/{_V_SPEC}/dspark/utils.py:46-62 (0.34.0: {_V_SPEC}/dspark/utils.py:133-145)",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            True,
            f"{_RECEIVES}; a missing lm_head or d2t is not detected",
            f"{_V25}/{_V_MODEL}:84-92,110-125,150-176, {_V_SPEC}/dspark/utils.py:55-62",
            until="0.28",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            True,
            f"{_RECEIVES}; the loader raises when lm_head or d2t is missing",
            f"vllm 0.29.0 vllm/{_V_MODEL}:284-300 (0.33.0: {_V_MODEL}:342-358)",
            since="0.29",
            until="0.33",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            True,
            f"{_RECEIVES}; the target's lm_head is never shared, and a missing lm_head or d2t is not "
            "detected",
            f"{_V34}/{_V_MODEL}:207-219,255-273,321-359, {_V_SPEC}/dspark/utils.py:136-145",
            since="0.34",
        ),
        Rule(
            "block-size",
            "block_size",
            "required",
            "num_speculative_tokens must be given (block_size is not read); pass block_size",
            f"{_V25}/config/speculative.py:937-941 (0.33.0: speculative.py:1614-1618)",
            until="0.33",
        ),
        Rule(
            "block-size",
            "block_size",
            "default",
            "num_speculative_tokens defaults to block_size; another value is accepted",
            f"{_V34}/{_V_SPEC}/dspark/config.py:78-85",
            since="0.34",
        ),
    ),
)

_S16 = "sglang 0.5.16 sglang/srt"
_S_DSPARK = "models/dspark.py"
_S_CONFIG = "speculative/dspark_components/dspark_config.py"

SGLANG = Engine(
    name="SGLang",
    key="sglang",
    releases=("0.5.16", "0.5.23"),
    source="sglang wheels 0.5.16 to 0.5.23 from PyPI",
    architectures=("Qwen3DSparkModel",),
    dispatch=Rule(
        "architectures",
        "architectures",
        (("Qwen3DSparkModel",), False),
        "the model registry finds the draft class by config.architectures among dspark.py's EntryClass",
        f"{_S16}/{_S_DSPARK}:505-509 (0.5.23: {_S_DSPARK}:977-995)",
    ),
    rules=(
        Rule(
            "config-keys",
            "config_keys",
            ("mask_token_id", "markov_head_type"),
            "raises without mask_token_id, or without markov_head_type when markov_rank > 0 "
            "(head_dim, block_size and target_layer_ids are not required)",
            f"{_S16}/{_S_CONFIG}:111,240 (0.5.23: {_S_CONFIG}:121,267)",
        ),
        Rule(
            "markov-head-types",
            "markov_head_types",
            ("vanilla", "gated", "rnn"),
            "builds vanilla, gated and rnn Markov heads",
            f"{_S16}/{_S_DSPARK}:264-284, {_S_CONFIG}:17 (0.5.23: {_S_DSPARK}:385-405, {_S_CONFIG}:22)",
        ),
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            False,
            "raises: its DSpark draft requires markov_rank > 0",
            f"{_S16}/{_S_DSPARK}:264-270,361-369 (0.5.23: {_S_DSPARK}:385-391,524-529)",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "ragged",
            "builds a confidence head (with or without Markov features) only when "
            "SGLANG_RAGGED_VERIFY_MODE is not 'static', the default; in those modes a draft without one "
            "fails to load (missing confidence weights)",
            f"{_S16}/{_S_DSPARK}:331-351,430-460, environ.py:769 (0.5.23: {_S_DSPARK}:487-507,667-696, "
            "environ.py:1572)",
        ),
        Rule(
            "embedding-layer",
            "embedding_layer",
            False,
            "its DFlash backbone refuses a target layer id below 0",
            f"{_S16}/models/dflash.py:361, speculative/dflash_utils.py:431-435 (0.5.23: dflash.py:756, "
            "dflash_utils.py:580-584)",
        ),
        Rule(
            "last-layer",
            "last_layer",
            False,
            "it captures before layer k+1, and layer n does not exist, so n-1 is never captured",
            f"{_S16}/models/qwen3.py:715, models/qwen2.py:372-376 (0.5.23: qwen3.py:805,524-531)",
        ),
        Rule(
            "target-weights",
            "target_weights",
            False,
            "it skips the draft's embed_tokens and lm_head and uses the target's",
            f"{_S16}/{_S_DSPARK}:354-358,376-380 (0.5.23: {_S_DSPARK}:510,550-555,633-641)",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            False,
            "it projects through the target's lm_head, drops the draft's lm_head and d2t, and builds "
            "markov_w2 [vocab_size, r], so a reduced draft's markov_w2 [K, r] does not load",
            f"{_S16}/{_S_DSPARK}:78,354-358,382-395 (0.5.23: {_S_DSPARK}:199,510,581-611)",
        ),
        Rule(
            "block-size",
            "block_size",
            None,
            "gamma is block_size (or --speculative-dspark-block-size), and "
            "--speculative-num-draft-tokens must equal gamma + 1 or it raises",
            f"{_S16}/arg_groups/speculative_hook.py:341-383 (0.5.23: speculative_hook.py:806-838)",
        ),
    ),
)

#: Every engine block. A family appends its own blocks (one per engine) in a delimited section
#: below; check_draft applies, per engine name, the block whose architectures name the draft.
# -- the engines' rules (Gemma 4 drafts, dspark-gemma4) ---------------------------------------------------
# A Gemma4DSparkModel draft is a block of its own in each engine that has a loader for it. Read from
# vLLM's wheels 0.26.0 to 0.34.0 (gemma4_dspark.py first ships in 0.26.0; every release in between was
# read where a rule could change: a rule cites 0.34.0's lines, or the first release of its range with
# 0.34.0's lines where they moved) and DeepSpec main at afdfa7c9. No SGLang release from 0.5.16 to
# 0.5.23 has a Gemma 4 DSpark model: its Qwen3 block's dispatch refuses the draft.

_DS_GEMMA4 = f"{_DS} deepspec/modeling/dspark/gemma4"
_V26 = "vllm 0.26.0 vllm"
_V_GEMMA4 = "model_executor/models/gemma4_dspark.py"


def _keys_are_values(facts: DraftFacts, required: bool) -> Outcome:
    if not required:
        return None
    on = bool(facts.get("attention_k_eq_v", False))
    return on, f"attention_k_eq_v {str(on).lower()}"


def _no_loader(facts: DraftFacts, _: Any) -> Outcome:
    return False, f"{', '.join(facts.architectures)} has no loader in this release"


def _logit_softcap(facts: DraftFacts, _: Any) -> Outcome:
    return True, f"final_logit_softcapping {facts.get('final_logit_softcapping')}"


CHECKS.update(keys_are_values=_keys_are_values, no_loader=_no_loader, logit_softcap=_logit_softcap)

DEEPSPEC_GEMMA4 = Engine(
    name=DEEPSPEC.name,
    key=DEEPSPEC.key,
    releases=DEEPSPEC.releases,
    source=DEEPSPEC.source,
    architectures=("Gemma4DSparkModel",),
    dispatch=Rule(
        "architectures",
        "architectures",
        (("Gemma4DSparkModel",), True),
        "eval.py picks Gemma4DSparkEvaluator by config.architectures[0] alone",
        f"{_DS} eval.py:10-16,54; deepspec/eval/dspark/evaluator.py:224-225",
    ),
    rules=(
        Rule(
            "config-keys",
            "config_keys",
            DEEPSPEC_CONFIG_KEYS,
            "Gemma4DSparkModel asserts each key is present, with no default",
            f"{_DS_GEMMA4}/modeling.py:250-268",
        ),
        _DEEPSPEC_MARKOV_HEAD_TYPES,
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            True,
            "build_markov_head returns no head, and sampling uses the base logits",
            f"{_DS_MARKOV}:290-291",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            None,
            "loads a confidence head with or without Markov features",
            f"{_DS_GEMMA4}/modeling.py:305-318",
        ),
        _DEEPSPEC_EMBEDDING_LAYER,
        Rule(
            "last-layer",
            "last_layer",
            False,
            "the evaluator asserts the final target layer is no feature layer",
            f"{_DS} deepspec/eval/dspark/evaluator.py:80",
        ),
        Rule(
            "target-weights",
            "target_weights",
            True,
            "the evaluator loads the draft alone and embeds and projects with its own weights",
            f"{_DS} deepspec/eval/dspark/evaluator.py:224-225",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            False,
            "DeepSpec's draft always has a full-vocabulary lm_head",
            f"{_DS_GEMMA4}/modeling.py:298",
        ),
    ),
)

VLLM_GEMMA4 = Engine(
    name=VLLM.name,
    key=VLLM.key,
    releases=VLLM.releases,
    source=VLLM.source,
    architectures=("Gemma4DSparkModel",),
    dispatch=Rule(
        "architectures",
        "architectures",
        (("Gemma4DSparkModel",), False),
        "the registry maps Gemma4DSparkModel to Gemma4DSparkForCausalLM",
        "vllm 0.26.0 vllm/model_executor/models/registry.py:612 "
        f"({_V34}/model_executor/models/registry.py:731)",
    ),
    rules=(
        Rule(
            "loader",
            "no_loader",
            None,
            "0.25.0 ships no gemma4_dspark.py and its registry has no Gemma4DSparkModel",
            f"{_V25}/model_executor/models/registry.py:596-597 (DSpark entries: no Gemma4DSparkModel)",
            until="0.25",
        ),
        Rule(
            "markov-head-types",
            "markov_head_types",
            ("vanilla",),
            "DSparkMarkovHead has markov_w1/markov_w2 only (vanilla)",
            f"{_V34}/{_V_GEMMA4}:195-200",
            since="0.26",
        ),
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            True,
            "the Markov head is built at any rank from a VocabParallelEmbedding and a ParallelLMHead, "
            "modules the missing-weight check passes over, so a checkpoint without markov_head "
            "tensors loads",
            f"{_V26}/{_V_GEMMA4}:179-187,291-312, {_V_MODEL}:54-59, "
            "model_executor/model_loader/default_loader.py:447-469",
            since="0.26",
            until="0.26",
            unverified=_ZERO_WIDTH,
        ),
        Rule(
            "markov-rank-zero",
            "markov_rank_zero",
            False,
            "the Markov head is built at any rank, its markov_w1 a plain nn.Embedding, and load_weights "
            "returns the names it loaded, so the missing-weight check raises for "
            "markov_head.markov_w1.weight, which a rank-0 checkpoint does not carry",
            f"vllm 0.27.0 vllm/{_V_GEMMA4}:184-189,293-314, {_V_MODEL}:56, "
            "model_executor/model_loader/default_loader.py:427,436-445,447-469 (0.34.0: "
            f"{_V_GEMMA4}:195-200,326-344, {_V_MODEL}:72, default_loader.py:540,549-559,562-613)",
            since="0.27",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "ignored",
            "the loader skips confidence_head weights and builds no confidence head (0.26 and 0.27 "
            "have no adaptive verification)",
            f"{_V26}/{_V_GEMMA4}:297-298 (0.27.1: {_V_GEMMA4}:299-300)",
            since="0.26",
            until="0.27",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "ignored",
            "the loader skips confidence_head weights and Gemma4DSparkModel has no confidence_head, "
            "which the speculator reads under enable_adaptive_verification, so leave that off",
            f"vllm 0.28.0 vllm/{_V_GEMMA4}:295-296, {_V_SPEC}/dspark/speculator.py:111 (0.29.0: "
            f"{_V_GEMMA4}:299-300, speculator.py:111; 0.30.0: {_V_GEMMA4}:299-300, speculator.py:106-109)",
            since="0.28",
            until="0.30",
        ),
        Rule(
            "confidence-head",
            "confidence_head",
            "adaptive",
            "builds the head when enable_confidence_head and uses it only with enable_adaptive_verification",
            f"vllm 0.31.0 vllm/{_V_GEMMA4}:194-205,309-331, {_V_SPEC}/dspark/speculator.py:106-109 "
            f"(0.34.0: {_V_GEMMA4}:201-212,326-344, speculator.py:177-180)",
            since="0.31",
        ),
        Rule(
            "embedding-layer",
            "embedding_layer",
            True,
            "id -1 becomes aux layer 0, captured before the first decoder layer: the scaled embedding "
            "output (embed_tokens * sqrt(hidden_size)), as HF's hidden_states[0]",
            f"{_V26}/model_executor/models/gemma4.py:840,1314,1326, {_V_SPEC}/eagle/eagle3_utils.py:53-55 "
            "(0.34.0: gemma4.py:886,1367,1379, eagle3_utils.py:128-130)",
            since="0.26",
        ),
        Rule(
            "reduced-vocabulary",
            "reduced_vocabulary",
            False,
            "lm_head is built [vocab_size, hidden] and its weight loader asserts vocab_size rows, so "
            "lm_head [K, H] does not load; d2t is dropped (draft_id_to_target_id = None)",
            f"{_V26}/{_V_GEMMA4}:280-289,299-310, model_executor/layers/vocab_parallel_embedding.py:465 "
            f"(0.34.0: {_V_GEMMA4}:315-324,332-343, vocab_parallel_embedding.py:520)",
            since="0.26",
        ),
        Rule(
            "keys-are-values",
            "keys_are_values",
            True,
            "the fused context K/V precompute asserts every draft layer is full attention with "
            "attention_k_eq_v",
            f"{_V34}/{_V_GEMMA4}:50-53,220-222",
            since="0.26",
        ),
        Rule(
            "target-weights",
            "target_weights",
            True,
            "dspark_shares_target_embeddings = False: the draft's own embed_tokens and lm_head load",
            f"{_V34}/{_V_GEMMA4}:304,326-344",
            since="0.26",
        ),
        Rule(
            "last-layer",
            "last_layer",
            False,
            "captured before the final norm, so features differ from HF-trained drafts",
            f"{_V34}/model_executor/models/gemma4.py:1379,1398-1400,1409-1413",
            since="0.26",
        ),
        Rule(
            "config-keys",
            "config_keys",
            ("target_layer_ids", "markov_rank", "layer_types"),
            "reads target_layer_ids, markov_rank and per-layer types",
            f"{_V34}/{_V_GEMMA4}:50-57,156-158,198",
            since="0.26",
        ),
        Rule(
            "logit-softcap",
            "logit_softcap",
            None,
            "the logits processor soft-caps with final_logit_softcapping",
            f"{_V34}/{_V_GEMMA4}:320-323",
            since="0.26",
        ),
    ),
)

ENGINES: tuple[Engine, ...] = (DEEPSPEC, DEEPSPEC_GEMMA4, VLLM, VLLM_GEMMA4, SGLANG)


# -- applying them ------------------------------------------------------------------------------------


def _dspark_verdict(facts: DraftFacts) -> Verdict:
    """This library's own loader: the config's DSpark fields validate (``validate_dspark_config``)."""
    from dspark_core import __version__

    verdict = Verdict("dspark", f"dspark-core {__version__}", ok=True, key="dspark")
    try:
        validate_dspark_config(SimpleNamespace(**facts.config))
    except DraftConfigError as exc:
        verdict.ok = False
        verdict.reasons.append(str(exc))
        return verdict
    if facts.tensor_names is not None and any(k not in facts.tensor_names for k in TARGET_WEIGHT_KEYS):
        verdict.notes.append("saved without the target's weights: load with from_pretrained(DIR, target=...)")
    return verdict


def _dispatched(blocks: Sequence[Engine], facts: DraftFacts) -> Engine | None:
    names = facts.architectures
    for block in blocks:
        accepted, first_only = block.dispatch.value
        candidates = names[:1] if first_only else names
        if any(name in block.architectures and name in accepted for name in candidates):
            return block
    return None


def _apply(rule: Rule, facts: DraftFacts) -> RuleResult | None:
    outcome = CHECKS[rule.kind](facts, rule.value)
    if outcome is None:
        return None
    ok, fact = outcome
    detail = f"{fact}: {rule.says}"
    if rule.unverified:
        detail = f"unverified: {detail} ({rule.unverified})"
    return RuleResult(rule.name, ok, detail, rule.citation, not rule.unverified, rule.kind in INFORMATIONAL)


def _engine_verdict(blocks: Sequence[Engine], facts: DraftFacts, release: Release) -> Verdict:
    first = blocks[0]
    verdict = Verdict(first.name, str(release), ok=True, key=first.key)
    block = _dispatched(blocks, facts)
    if block is None:
        accepted = sorted({name for b in blocks for name in b.architectures})
        where = "config.architectures[0]" if first.dispatch.value[1] else "config.architectures"
        detail = f"{where} of {facts.architectures} names none of {accepted}: {first.dispatch.says}"
        verdict.results.append(RuleResult("architectures", False, detail, first.dispatch.citation))
    else:
        named = f"config.architectures {facts.architectures}"
        dispatch = RuleResult(
            "architectures", True, f"{named}: {block.dispatch.says}", block.dispatch.citation
        )
        verdict.results.append(dispatch)
        verdict.results += [r for r in (_apply(rule, facts) for rule in block.rules_for(release)) if r]
    for result in verdict.results:
        if not result.ok:
            verdict.ok = False
            verdict.reasons.append(f"{result.detail} [{result.citation}]")
        elif result.informational:
            verdict.notes.append(f"{result.rule}: {result.detail}")
    return verdict


def engine_release(key: str, text: str | None = None, engines: Iterable[Engine] = ENGINES) -> Release:
    """The release of engine ``key`` to check against: ``text``, or the newest supported one.

    Raises :class:`DraftConfigError` naming the supported range for a release outside it.
    """
    blocks = [engine for engine in engines if engine.key == key]
    if not blocks:
        known = sorted({engine.key for engine in engines})
        raise DraftConfigError(f"no engine {key!r}; the engines are {', '.join(known)}")
    engine = blocks[0]
    release = Release.parse(text) if text else Release.parse(engine.newest)
    if not engine.supports(release):
        span = " to ".join(dict.fromkeys((engine.releases[0], engine.releases[-1])))
        raise DraftConfigError(
            f"{engine.name} {release} is outside the supported releases ({span}); its rules were read "
            f"from {engine.source}"
        )
    return release


def engine_rule(
    key: str, facts: DraftFacts, release: Release, name: str, engines: Iterable[Engine] = ENGINES
) -> Rule | None:
    """The reading ``name`` at ``release`` of engine ``key``'s block that loads the draft.

    None when no block of the engine names the draft's class, or that block has no such reading.
    """
    block = _dispatched([engine for engine in engines if engine.key == key], facts)
    if block is None:
        return None
    return next((rule for rule in block.rules_for(release) if rule.name == name), None)


def check_draft(
    facts: DraftFacts,
    engines: Iterable[Engine] = ENGINES,
    releases: Mapping[str, str] | None = None,
) -> list[Verdict]:
    """Per loader (dspark first, then each engine), whether it can load the draft and why not.

    ``releases`` maps an engine key (``vllm``) to the release to check (``0.25``); an engine not
    named is checked at its newest supported release.
    """
    engines = tuple(engines)
    releases = dict(releases or {})
    by_name: dict[str, list[Engine]] = {}
    for engine in engines:
        by_name.setdefault(engine.name, []).append(engine)
    verdicts = [_dspark_verdict(facts)]
    for blocks in by_name.values():
        release = engine_release(blocks[0].key, releases.get(blocks[0].key), engines)
        verdicts.append(_engine_verdict(blocks, facts, release))
    return verdicts


def draft_facts(config: Any, tensor_names: Iterable[str] | None = None) -> DraftFacts:
    """Facts from a config (a mapping, or an object with ``to_dict()``) and optional tensor names."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    names = None if tensor_names is None else frozenset(tensor_names)
    return DraftFacts(values, names)


def _safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    # The header is an 8-byte little-endian length and a JSON object keyed by tensor name.
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def read_draft_dir(folder: Path) -> DraftFacts:
    """The facts of a saved draft directory: its ``config.json`` and its checkpoint's tensors."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DraftConfigError(f"{config_path} is not valid JSON ({exc})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(weight_map.values())):
            if (folder / shard).is_file():
                shapes.update(_safetensors_header(folder / shard))
        names = set(weight_map)
    elif (folder / "model.safetensors").is_file():
        shapes = _safetensors_header(folder / "model.safetensors")
        names = set(shapes)
    else:
        raise DraftConfigError(
            f"{folder} has a config.json but no model.safetensors (or its index): save the draft with "
            "save_pretrained(DIR) (safetensors)"
        )
    return DraftFacts(config, frozenset(names), shapes)


def serving_summary(verdicts: Sequence[Verdict]) -> str | None:
    """One line naming each listed engine that cannot serve the draft, or None when all can."""
    failing = [v for v in verdicts if not v.ok and v.engine != "dspark"]
    if not failing:
        return None
    parts = "; ".join(f"{v.engine} {v.version} cannot ({v.reasons[0].split(' [')[0]})" for v in failing)
    return f"serving: {parts}. Run `dspark check-draft` on the exported draft for the rules and their sources"
