"""``dspark check-draft DIR``: which loaders can load a saved draft, and why not; the vLLM config.

The rules are :data:`dspark_core.serving.ENGINES`, each citing the engine commit it was read from.
Exits 1 when the draft is not even a valid DSpark draft, or when an engine named by ``--require``
cannot load it; an engine that cannot serve the draft is otherwise reported, not an error.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "say which loaders (dspark, DeepSpec/NeMo, vLLM, SGLang) can load a saved draft, and why not"

#: --require spellings -> the engine names of dspark_core.serving
_ENGINE_KEYS = {
    "dspark": "dspark",
    "deepspec": "DeepSpec/NeMo",
    "nemo": "DeepSpec/NeMo",
    "vllm": "vLLM",
    "sglang": "SGLang",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("draft_dir", metavar="DIR", help="a saved draft directory (save_pretrained)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        choices=sorted(_ENGINE_KEYS),
        metavar="ENGINE",
        help=f"exit 1 unless this loader can load the draft (repeatable: {', '.join(sorted(_ENGINE_KEYS))})",
    )


def _print_text(verdicts: list[Any], speculative: dict[str, Any] | None, calibration: list[str]) -> None:
    width = max(len(v.engine) for v in verdicts) + 2
    for verdict in verdicts:
        # why not, for a loader that cannot; otherwise its notes, less the assumptions (see --json)
        lines = verdict.reasons or [n for n in verdict.notes if not n.startswith("assumed")]
        first = f"  {lines[0]}" if lines else ""
        print(f"{verdict.engine:<{width}}{'ok' if verdict.ok else 'no'}{first}")
        for line in lines[1:]:
            print(f"{'':<{width + 4}}{line}")
    print("\n".join(calibration))
    if speculative is None:
        print("vLLM speculative config: none (vLLM cannot load this draft)")
    else:
        print(f"vLLM speculative config: {json.dumps(speculative)}")
    print("Rules marked unverified are assumptions; --json lists every assumption with its source.")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run(args: argparse.Namespace) -> int:
    from dspark_core.model_dirs import require_model_dir
    from dspark_core.serving import check_draft, read_draft_dir, vllm_speculative_config

    folder = require_model_dir(args.draft_dir, "draft")
    facts = read_draft_dir(folder)
    verdicts = check_draft(facts)
    by_name = {v.engine: v for v in verdicts}
    speculative = vllm_speculative_config(folder, facts) if by_name["vLLM"].ok else None
    from dspark_core.calibration.serving import calibration_status, status_lines

    calibration = calibration_status(folder, _int_or_none(facts.get("block_size")), speculative)
    if args.json:
        payload = {
            "draft": str(folder),
            "verdicts": [v.to_dict() for v in verdicts],
            "vllm_speculative_config": speculative,
            "calibration": calibration.to_dict(),
        }
        print(json.dumps(payload, indent=2))
    else:
        _print_text(verdicts, speculative, status_lines(calibration))
    required = [_ENGINE_KEYS[key] for key in args.require]
    return 0 if by_name["dspark"].ok and all(by_name[name].ok for name in required) else 1
