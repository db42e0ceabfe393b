"""The command lines that serve a saved draft with vLLM or SGLang, per release.

Read from the same released sources as :mod:`dspark_core.serving`: vLLM takes the draft through
``--speculative-config`` (``enable_adaptive_verification`` exists from 0.28, and is given only where
the draft's loader, per its ``confidence-head`` rule, builds the confidence head the flag uses: a
Qwen3 draft from 0.28, a Gemma 4 draft from 0.31); SGLang through ``--speculative-algorithm DSPARK``
with the block size as gamma, and its confidence head only under a non-static
``SGLANG_RAGGED_VERIFY_MODE``. Torch-free.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from dspark_core.serving import DraftFacts, Release, engine_rule

__all__ = ["sglang_serving", "vllm_serving"]

#: The ``confidence-head`` readings of vLLM under which its speculator uses the draft's confidence
#: head, with enable_adaptive_verification (added in 0.28.0, config/speculative.py:241), the only
#: switch for it. Under "ignored" the flag is not printed: 0.25 to 0.27 have no such flag, and a Gemma 4
#: draft's loader builds no confidence head before 0.31, so the flag fails there.
VLLM_ADAPTIVE_READINGS = frozenset({"adaptive", "adaptive-required"})
#: SGLang's ragged-verify modes that build the confidence head (sglang 0.5.16 and 0.5.23
#: sglang/srt/speculative/ragged_verify.py:13-16).
SGLANG_CONFIDENCE_MODE = "cap-accept"
TARGET_PLACEHOLDER = "TARGET"


def _block_size(facts: DraftFacts) -> int:
    return int(facts.get("block_size"))


def vllm_serving(
    folder: str | Path, facts: DraftFacts, release: Release, target: str | None = None
) -> dict[str, Any]:
    """``{"speculative_config": {...}, "command": "vllm serve ..."}`` for vLLM ``release``."""
    config: dict[str, Any] = {
        "method": "dspark",
        "model": str(Path(folder).resolve()),
        # 0.25 to 0.33 require it; 0.34 defaults it to block_size: always give it.
        "num_speculative_tokens": _block_size(facts),
    }
    head = engine_rule("vllm", facts, release, "confidence-head")
    if facts.confidence_head and head is not None and head.value in VLLM_ADAPTIVE_READINGS:
        config["enable_adaptive_verification"] = True
    command = " ".join(
        [
            "vllm",
            "serve",
            shlex.quote(target or TARGET_PLACEHOLDER),
            "--speculative-config",
            shlex.quote(json.dumps(config)),
        ]
    )
    return {"release": str(release), "speculative_config": config, "command": command}


def sglang_serving(
    folder: str | Path, facts: DraftFacts, release: Release, target: str | None = None
) -> dict[str, Any]:
    """``{"env": {...}, "args": [...], "command": ...}`` for SGLang ``release``."""
    env = {"SGLANG_RAGGED_VERIFY_MODE": SGLANG_CONFIDENCE_MODE if facts.confidence_head else "static"}
    args = [
        "--speculative-algorithm",
        "DSPARK",
        "--speculative-draft-model-path",
        str(Path(folder).resolve()),
        "--speculative-dspark-block-size",
        str(_block_size(facts)),
    ]
    words = [f"{k}={v}" for k, v in env.items()]
    words += ["python", "-m", "sglang.launch_server", "--model-path", target or TARGET_PLACEHOLDER, *args]
    notes = []
    if facts.confidence_head:
        notes.append(
            "ragged verification trims by a profiled SPS table: add --speculative-dspark-sps-table-path "
            "(built with sglang.benchmark.dspark_sps_profiler), or it verifies every draft token"
        )
    return {
        "release": str(release),
        "env": env,
        "args": args,
        "command": " ".join(shlex.quote(word) for word in words),
        "notes": notes,
    }
