"""Which loaders can load a saved DSpark draft: the engines' rules as data, and the check over them.

Each :class:`Engine` lists the :class:`Rule` s its draft loader imposes, every rule citing the file and
commit of the engine it was read from; a rule that could not be read from source says so
(``verified=False``) and is reported as "unverified". :func:`check_draft` applies every engine's rules
to the facts of one draft (its ``config.json`` and, when known, its checkpoint's tensor names) and says,
per engine, whether it can load the draft and why not. ``dspark check-draft`` prints that, and
``dspark train`` runs it on the draft config before the first step.

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
    "DraftFacts",
    "Engine",
    "Rule",
    "Verdict",
    "check_draft",
    "draft_facts",
    "read_draft_dir",
    "serving_summary",
    "vllm_speculative_config",
]

TARGET_WEIGHT_KEYS = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class DraftFacts:
    """What the rules look at, read from a draft's config (and checkpoint, when there is one)."""

    config: Mapping[str, Any]
    #: tensor names of the saved checkpoint; None when only the config is known (training)
    tensor_names: frozenset[str] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        return self.config.get(name, default)

    @property
    def markov_rank(self) -> int:
        return int(self.get("markov_rank", 0) or 0)

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.get("target_layer_ids") or []]

    @property
    def last_layer(self) -> int:
        return int(self.get("num_target_layers", 0) or 0) - 1


@dataclass(frozen=True)
class Rule:
    """One requirement of an engine's draft loader. ``kind`` names its check in :data:`CHECKS`;
    ``value`` is what the loader accepts; ``source`` is the engine file (and commit) it was read
    from; ``verified=False`` marks an assumption that could not be read from the engine's source."""

    kind: str
    value: Any
    source: str
    verified: bool = True


@dataclass(frozen=True)
class Engine:
    name: str
    #: the engine version (or commit) the rules were read from
    version: str
    rules: tuple[Rule, ...]
    #: how the engine uses the draft's block_size, printed as a note
    block_size: str


@dataclass
class Verdict:
    engine: str
    version: str
    ok: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.version,
            "ok": self.ok,
            "reasons": self.reasons,
            "notes": self.notes,
        }


# -- the checks: each returns why the draft fails the rule, or None ----------------------------------


def _architectures(facts: DraftFacts, accepted: Sequence[str]) -> str | None:
    names = list(facts.get("architectures") or [])
    if any(name in accepted for name in names):
        return None
    return (
        f"config.architectures {names} names none of {list(accepted)}, which is how it finds a DSpark draft"
    )


def _model_types(facts: DraftFacts, accepted: Sequence[str]) -> str | None:
    model_type = facts.get("model_type")
    return None if model_type in accepted else f"model_type {model_type!r} is not {' or '.join(accepted)}"


def _markov_head_types(facts: DraftFacts, accepted: Sequence[str]) -> str | None:
    if facts.markov_rank == 0:
        return None
    head = facts.get("markov_head_type", "vanilla")
    if head in accepted:
        return None
    return f"markov_head_type {head!r}: it loads only {'/'.join(accepted)} Markov heads"


def _markov_rank_zero(facts: DraftFacts, accepted: bool) -> str | None:
    if facts.markov_rank > 0 or accepted:
        return None
    return "markov_rank 0: its DSpark path needs a Markov head"


def _confidence_head(facts: DraftFacts, required: bool) -> str | None:
    if not required or facts.get("enable_confidence_head", False):
        return None
    return "no confidence head (enable_confidence_head false): its DSpark path needs one"


def _confidence_with_markov(facts: DraftFacts, required: bool) -> str | None:
    if not required or not facts.get("enable_confidence_head", False):
        return None
    if facts.get("confidence_head_with_markov", False):
        return None
    return "confidence_head_with_markov false: its confidence head reads [hidden ; Markov embedding]"


def _embedding_layer(facts: DraftFacts, accepted: bool) -> str | None:
    if accepted or -1 not in facts.layer_ids:
        return None
    return "target_layer_ids contains -1 (the embedding output), which it cannot capture"


def _last_layer(facts: DraftFacts, accepted: bool) -> str | None:
    last = facts.last_layer
    if accepted or last < 0 or last not in facts.layer_ids:
        return None
    return (
        f"target_layer_ids contains {last} = n-1, the target's last layer (HF output_hidden_states gives it "
        "post final norm), which it does not capture"
    )


def _target_weights(facts: DraftFacts, required: bool) -> str | None:
    if not required or facts.tensor_names is None:
        return None
    absent = [key for key in TARGET_WEIGHT_KEYS if key not in facts.tensor_names]
    if not absent:
        return None
    return f"the checkpoint has no {' or '.join(absent)} (saved without the target's weights); it needs both"


def _config_fields(facts: DraftFacts, names: Sequence[str]) -> str | None:
    missing = [name for name in names if facts.get(name) is None]
    return f"config.json lacks {', '.join(missing)}" if missing else None


#: Rule kind -> check. A rule's ``value`` is the check's second argument.
CHECKS: dict[str, Callable[[DraftFacts, Any], str | None]] = {
    "architectures": _architectures,
    "model_types": _model_types,
    "markov_head_types": _markov_head_types,
    "markov_rank_zero": _markov_rank_zero,
    "confidence_head": _confidence_head,
    "confidence_with_markov": _confidence_with_markov,
    "embedding_layer": _embedding_layer,
    "last_layer": _last_layer,
    "target_weights": _target_weights,
    "config_fields": _config_fields,
}


# -- the engines' rules -------------------------------------------------------------------------------

_VLLM_MODEL = "vllm/model_executor/models/qwen3_dspark.py @0302ff40"
_VLLM_CONFIG = "vllm/config/speculative.py @002e77c1"
_VLLM_AUX = "vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py @0cfdd2e1 (aux layer = target layer id + 1)"
_SGL_MODEL = "python/sglang/srt/models/qwen3_dspark.py @2dd29f7b"
_SGL_WORKER = "python/sglang/srt/speculative/dspark_worker_v2.py @028b6e61"
_SGL_CAPTURE = "python/sglang/srt/models/qwen3.py @01b5f572 set_dflash_layers_to_capture (before layer k+1)"
_DEEPSPEC_EVAL = "deepspec/eval/dspark/evaluator.py @3bc8dc74"
_DEEPSPEC_COMMON = "deepspec/modeling/dspark/common.py @9b9cc8ab"
_METHOD = "the dspark method reference, section 1 (not re-read from the engine's source)"

ENGINES: tuple[Engine, ...] = (
    Engine(
        name="DeepSpec/NeMo",
        version="deepseek-ai/DeepSpec main @3bc8dc74; NeMo AutoModel unverified (assumed to match DeepSpec)",
        rules=(
            Rule(
                "architectures",
                ("Qwen3DSparkModel", "Gemma4DSparkModel"),
                f"{_DEEPSPEC_EVAL} (one evaluator per draft class)",
            ),
            # Forks of DeepSpec differ here (some build vanilla only): the method reference's reading.
            Rule("markov_head_types", ("vanilla", "gated", "rnn"), _METHOD, verified=False),
            Rule("markov_rank_zero", True, "deepspec/modeling/dspark/qwen3/config.py @041b6523 (r >= 0)"),
            Rule("embedding_layer", True, f"{_DEEPSPEC_COMMON} (-1 is hidden_states[0])"),
            Rule("last_layer", False, f"{_DEEPSPEC_EVAL} assert_no_final_target_layer"),
            Rule(
                "target_weights",
                True,
                "from_pretrained of the draft class attaches no target weights",
                verified=False,
            ),
        ),
        block_size="proposes block_size tokens per round (max_proposal_tokens = block_size)",
    ),
    Engine(
        name="vLLM",
        version="vllm-project/vllm main @0302ff40 (method 'dspark', in vLLM since about 0.27)",
        rules=(
            Rule("architectures", ("Qwen3DSparkModel",), f"{_VLLM_CONFIG} (method detection)"),
            Rule("model_types", ("qwen3",), f"{_VLLM_CONFIG} (the DFlash Qwen3 backbone)"),
            Rule("markov_head_types", ("vanilla",), f"{_VLLM_MODEL} DSparkMarkovHead (markov_w1/w2 only)"),
            Rule(
                "markov_rank_zero",
                False,
                f"{_VLLM_MODEL} builds the Markov head unconditionally",
                verified=False,
            ),
            Rule(
                "embedding_layer",
                True,
                f"{_VLLM_AUX}: aux layer 0 is the embedding stream",
                verified=False,
            ),
            Rule("last_layer", False, f"{_VLLM_AUX}: aux layer n is past the last layer, never captured"),
            Rule(
                "config_fields",
                ("block_size", "mask_token_id", "target_layer_ids", "markov_rank"),
                _VLLM_MODEL,
            ),
        ),
        block_size="num_speculative_tokens must equal block_size: slots past it garble the proposal",
    ),
    Engine(
        name="SGLang",
        version="sgl-project/sglang main @2dd29f7b (DSparkWorkerV2 @028b6e61)",
        rules=(
            Rule("architectures", ("Qwen3DSparkModel",), f"{_SGL_MODEL} (EntryClass, matched by class name)"),
            Rule("markov_head_types", ("vanilla",), f"{_SGL_MODEL} resolve_qwen3_dspark_weight"),
            Rule("markov_rank_zero", False, f"{_SGL_MODEL}: an r=0 draft is for the DFlash worker"),
            Rule(
                "confidence_head",
                True,
                f"{_SGL_WORKER} computes the confidence head every round",
                verified=False,
            ),
            Rule("confidence_with_markov", True, f"{_SGL_MODEL} Qwen3DSparkBackbone raises otherwise"),
            # qwen3.py @01b5f572 would capture -1 "before layer 0"; the method reference says it cannot.
            Rule("embedding_layer", False, _METHOD, verified=False),
            Rule("last_layer", False, f"{_SGL_CAPTURE}: layer n does not exist, so n-1 is never captured"),
            Rule("target_weights", True, f"{_SGL_MODEL} load_weights raises for parameters never loaded"),
            Rule(
                "config_fields",
                ("head_dim", "target_layer_ids", "block_size", "mask_token_id"),
                _SGL_MODEL,
            ),
        ),
        block_size="verifies block_size drafts plus the anchor (speculative_num_draft_tokens only warns)",
    ),
)


# -- applying them ------------------------------------------------------------------------------------


def _dspark_verdict(facts: DraftFacts) -> Verdict:
    """This library's own loader: the config's DSpark fields validate (``validate_dspark_config``)."""
    from dspark_core import __version__

    verdict = Verdict("dspark", f"dspark-core {__version__}", ok=True)
    try:
        validate_dspark_config(SimpleNamespace(**facts.config))
    except DraftConfigError as exc:
        verdict.ok = False
        verdict.reasons.append(str(exc))
        return verdict
    if facts.tensor_names is not None and any(k not in facts.tensor_names for k in TARGET_WEIGHT_KEYS):
        verdict.notes.append("saved without the target's weights: load with from_pretrained(DIR, target=...)")
    return verdict


def _engine_verdict(engine: Engine, facts: DraftFacts) -> Verdict:
    verdict = Verdict(engine.name, engine.version, ok=True, notes=[f"block size: {engine.block_size}"])
    verdict.notes += [
        f"assumed (unverified): {r.kind} {r.value!r} [{r.source}]" for r in engine.rules if not r.verified
    ]
    for rule in engine.rules:
        failure = CHECKS[rule.kind](facts, rule.value)
        if failure is None:
            continue
        verdict.ok = False
        mark = "unverified: " if not rule.verified else ""
        verdict.reasons.append(f"{mark}{failure} [{rule.source}]")
    return verdict


def check_draft(facts: DraftFacts, engines: Iterable[Engine] | None = None) -> list[Verdict]:
    """Per loader (dspark first, then each engine), whether it can load the draft and why not.

    ``engines`` defaults to the rules for the draft's architecture (:func:`engines_for`)."""
    chosen = engines_for(facts) if engines is None else engines
    return [_dspark_verdict(facts), *(_engine_verdict(engine, facts) for engine in chosen)]


def draft_facts(config: Any, tensor_names: Iterable[str] | None = None) -> DraftFacts:
    """Facts from a config (a mapping, or an object with ``to_dict()``) and optional tensor names."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    names = None if tensor_names is None else frozenset(tensor_names)
    return DraftFacts(values, names)


def _safetensors_names(path: Path) -> set[str]:
    # The header is an 8-byte little-endian length and a JSON object keyed by tensor name.
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name for name in header if name != "__metadata__"}


def read_draft_dir(folder: Path) -> DraftFacts:
    """The facts of a saved draft directory: its ``config.json`` and its checkpoint's tensor names."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DraftConfigError(f"{config_path} is not valid JSON ({exc})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    elif (folder / "model.safetensors").is_file():
        names = _safetensors_names(folder / "model.safetensors")
    else:
        raise DraftConfigError(
            f"{folder} has a config.json but no model.safetensors (or its index): save the draft with "
            "save_pretrained(DIR) (safetensors)"
        )
    return DraftFacts(config, frozenset(names))


def vllm_speculative_config(folder: str | Path, facts: DraftFacts) -> dict[str, Any]:
    """The ``--speculative-config`` to serve the draft in ``folder`` with vLLM."""
    return {
        "method": "dspark",
        "model": str(Path(folder).resolve()),
        "num_speculative_tokens": int(facts.get("block_size")),
    }


def serving_summary(verdicts: Sequence[Verdict]) -> str | None:
    """One line naming each listed engine that cannot serve the draft, or None when all can."""
    failing = [v for v in verdicts if not v.ok and v.engine != "dspark"]
    if not failing:
        return None
    parts = "; ".join(f"{v.engine} cannot ({v.reasons[0].split(' [')[0]})" for v in failing)
    return f"serving: {parts}. Run `dspark check-draft` on the exported draft for the rules and their sources"


# ==== Gemma 4 drafts (dspark-gemma4; owner: gemma) ===================================================
# A Gemma4DSparkModel draft meets other loaders than a Qwen3 one: each engine's rules for it, read from
# vLLM 0.34.0's released wheel and DeepSpec @afdfa7c9. engines_for() picks them by the draft's
# architecture; every other draft keeps ENGINES.

_V34 = "vLLM 0.34.0 wheel"
_V34_GEMMA4 = f"vllm/model_executor/models/gemma4_dspark.py ({_V34})"
_DEEPSPEC_GEMMA4 = "deepspec/modeling/dspark/gemma4/config.py @afdfa7c9"
GEMMA4_TEXT_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")


def _keys_are_values(facts: DraftFacts, required: bool) -> str | None:
    if not required or facts.get("attention_k_eq_v", False):
        return None
    return (
        "attention_k_eq_v false: its fused context K/V precompute assumes every layer's values are its keys"
    )


CHECKS["keys_are_values"] = _keys_are_values
__all__ += ["GEMMA4_ENGINES", "engines_for"]

GEMMA4_ENGINES: tuple[Engine, ...] = (
    Engine(
        name="DeepSpec/NeMo",
        version="deepseek-ai/DeepSpec main @afdfa7c9; NeMo AutoModel unverified (assumed to match DeepSpec)",
        rules=(
            Rule(
                "architectures",
                ("Gemma4DSparkModel",),
                "deepspec/eval/dspark/evaluator.py @afdfa7c9:224-225 Gemma4DSparkEvaluator",
            ),
            Rule(
                "model_types",
                GEMMA4_TEXT_MODEL_TYPES,
                f"{_DEEPSPEC_GEMMA4}:9-19 get_gemma4_text_config (a copy of the target's text config)",
            ),
            Rule(
                "markov_head_types",
                ("vanilla", "gated", "rnn"),
                "deepspec/modeling/dspark/markov_head.py @afdfa7c9:287-311 build_markov_head",
            ),
            Rule(
                "markov_rank_zero",
                True,
                "deepspec/modeling/dspark/markov_head.py @afdfa7c9:290-291 (r=0: none)",
            ),
            Rule("embedding_layer", True, f"{_DEEPSPEC_COMMON} (-1 is hidden_states[0])"),
            Rule(
                "last_layer",
                False,
                "deepspec/eval/dspark/evaluator.py @afdfa7c9:80 assert_no_final_target_layer",
            ),
            Rule(
                "target_weights",
                True,
                "from_pretrained of the draft class attaches no target weights",
                verified=False,
            ),
        ),
        block_size="proposes block_size tokens per round (max_proposal_tokens = block_size)",
    ),
    Engine(
        name="vLLM",
        version=f"{_V34} (method 'dspark', Gemma4DSparkForCausalLM)",
        rules=(
            Rule(
                "architectures",
                ("Gemma4DSparkModel",),
                f"vllm/model_executor/models/registry.py ({_V34}):731",
            ),
            Rule(
                "model_types",
                GEMMA4_TEXT_MODEL_TYPES,
                f"{_V34_GEMMA4}:55-57 reads per_layer_config, which a Gemma 4 text config builds",
            ),
            Rule(
                "markov_head_types",
                ("vanilla",),
                f"{_V34_GEMMA4}:195-200 DSparkMarkovHead (markov_w1/w2 only)",
            ),
            Rule("markov_rank_zero", False, f"{_V34_GEMMA4}:195-200 builds the Markov head unconditionally"),
            Rule(
                "keys_are_values",
                True,
                f"{_V34_GEMMA4}:220-222 (run after loading: qwen3_dflash.py ({_V34}):1023-1024)",
            ),
            Rule(
                "target_weights",
                True,
                f"{_V34_GEMMA4}:304 dspark_shares_target_embeddings = False; 326-344 loads its own",
            ),
            Rule(
                "embedding_layer",
                True,
                f"{_VLLM_AUX}: aux layer 0 is the embedding stream",
                verified=False,
            ),
            Rule("last_layer", False, f"{_VLLM_AUX}: aux layer n is past the last layer, never captured"),
            Rule(
                "config_fields",
                # not global_head_dim: a config saved with the default 512 leaves it out (diff dict)
                ("target_layer_ids", "markov_rank", "layer_types", "block_size"),
                f"{_V34_GEMMA4}:50-57,156-158,198 (block_size: {_VLLM_CONFIG})",
            ),
        ),
        block_size=(
            "num_speculative_tokens must equal block_size; logits soft-capped by final_logit_softcapping "
            f"({_V34_GEMMA4}:320-323)"
        ),
    ),
    Engine(
        name="SGLang",
        version="sgl-project/sglang main @2dd29f7b (DSparkWorkerV2 @028b6e61)",
        rules=(
            Rule(
                "architectures",
                ("Qwen3DSparkModel",),
                f"{_SGL_MODEL} (EntryClass, matched by class name; no Gemma 4 DSpark model)",
            ),
        ),
        block_size="verifies block_size drafts plus the anchor (speculative_num_draft_tokens only warns)",
    ),
)

#: Rule sets per draft architecture (``config.architectures[0]``); any other draft gets :data:`ENGINES`.
ENGINES_BY_ARCHITECTURE: dict[str, tuple[Engine, ...]] = {"Gemma4DSparkModel": GEMMA4_ENGINES}


def engines_for(facts: DraftFacts) -> tuple[Engine, ...]:
    """The engines' rules for this draft's architecture."""
    for name in facts.get("architectures") or []:
        if name in ENGINES_BY_ARCHITECTURE:
            return ENGINES_BY_ARCHITECTURE[name]
    return ENGINES


# ==== end of the Gemma 4 block ========================================================================
