"""``dspark check-draft DIR``: which loaders can load a saved draft, why, and the serving flags.

The rules are :data:`dspark_core.serving.ENGINES`, each citing the release, file and line it was read
from; ``--engine-version vllm=0.25`` checks another supported release than the newest. Exits 1 when
the draft is not even a valid DSpark draft, when an engine named by ``--require`` cannot load it,
or when ``--target`` resolves to another family than the draft's (unless
``--allow-family-mismatch``); an engine that cannot serve the draft is otherwise reported, not an
error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "say which loaders (dspark, DeepSpec, vLLM, SGLang) can load a saved draft, why, and how to serve it"

#: The --json layout: version 2 added "schema_version", "releases", "target", "serving", "nemo" and
#: each verdict's "rules"; every version-1 key is kept.
SCHEMA_VERSION = 2
REQUIRABLE = ("deepspec", "dspark", "nemo", "sglang", "vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("draft_dir", metavar="DIR", help="a saved draft directory (save_pretrained)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (one stable schema)")
    parser.add_argument(
        "--engine-version",
        action="append",
        default=[],
        metavar="ENGINE=RELEASE",
        help="check this engine release instead of the newest supported one (repeatable): vllm=0.25 to "
        "vllm=0.34, sglang=0.5.16 to sglang=0.5.23, deepspec=main",
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        choices=REQUIRABLE,
        metavar="ENGINE",
        help=f"exit 1 unless this loader can load the draft (repeatable: {', '.join(REQUIRABLE)})",
    )
    parser.add_argument(
        "--target",
        metavar="TARGET",
        help="the target model folder: refuse a draft of another family, and name it in the serving flags",
    )
    parser.add_argument(
        "--allow-family-mismatch",
        action="store_true",
        help="check the draft even when --target resolves to another family",
    )


def _engine_versions(values: list[str]) -> dict[str, str]:
    from dspark_core.errors import DraftConfigError
    from dspark_core.serving import engine_release

    chosen: dict[str, str] = {}
    for value in values:
        key, sep, release = value.partition("=")
        if not sep or not release:
            raise DraftConfigError(f"--engine-version {value!r}: write ENGINE=RELEASE, e.g. vllm=0.25")
        key = key.strip().lower()
        chosen[key] = str(engine_release(key, release))
    return chosen


def _check_target_family(draft_config: dict[str, Any], target: str, draft_dir: Path) -> None:
    from dspark_core.family_guard import check_draft_family
    from dspark_core.model_dirs import require_model_dir
    from dspark_core.registry import resolve_dspark_draft_spec
    from dspark_core.spec import spec_reference

    folder = require_model_dir(target, "--target")
    target_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architectures = target_config.get("architectures") or []
    reference = spec_reference(resolve_dspark_draft_spec(architectures))
    expected = reference.rpartition(":")[2].rpartition(".")[2]
    check_draft_family(
        draft_config,
        source=f"draft {str(draft_dir)!r}",
        expected_architecture=expected,
        loaded_as=f"the target {'/'.join(architectures)} resolves to",
    )


def _print_text(payload: dict[str, Any], verdicts: list[Any], calibration: list[str]) -> None:
    width = max(len(f"{v.engine} {v.version}") for v in verdicts if v.engine != "dspark") + 2
    for verdict in verdicts:
        label = "dspark" if verdict.engine == "dspark" else f"{verdict.engine} {verdict.version}"
        print(f"{label:<{width}}{'ok' if verdict.ok else 'no'}")
        if verdict.engine == "dspark":
            lines = verdict.reasons + verdict.notes
        else:
            shown = [r for r in verdict.results if not r.ok or r.informational or not r.verified]
            lines = [f"{r.rule}: {r.detail} [{r.citation}]" for r in shown]
        for line in lines:
            print(f"    {line}")
    for name, key in (("vLLM", "vllm"), ("SGLang", "sglang")):
        serving = payload["serving"][key]
        if serving is None:
            print(f"serve with {name}: none ({name} cannot load this draft)")
            continue
        print(f"serve with {name} {serving['release']}: {serving['command']}")
        for note in serving.get("notes", []):
            print(f"    {note}")
    print("\n".join(calibration))
    print(payload["nemo"])
    print(
        "Shown: refusing, unverified and informational rules; --json lists every rule applied, with its "
        "citation."
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run(args: argparse.Namespace) -> int:
    from dspark_core.calibration.serving import calibration_status, status_lines
    from dspark_core.errors import DraftConfigError
    from dspark_core.model_dirs import require_model_dir
    from dspark_core.serving import NEMO_NOTE, Release, check_draft, read_draft_dir
    from dspark_core.serving_flags import sglang_serving, vllm_serving

    if "nemo" in args.require:
        raise DraftConfigError(f"--require nemo cannot hold: {NEMO_NOTE}")
    releases = _engine_versions(args.engine_version)
    folder = require_model_dir(args.draft_dir, "draft")
    facts = read_draft_dir(folder)
    if args.target and not args.allow_family_mismatch:
        _check_target_family(dict(facts.config), args.target, folder)
    verdicts = check_draft(facts, releases=releases)
    by_key = {v.key: v for v in verdicts}
    serving: dict[str, Any] = {"vllm": None, "sglang": None}
    for key, build in (("vllm", vllm_serving), ("sglang", sglang_serving)):
        verdict = by_key[key]
        if verdict.ok:
            serving[key] = build(folder, facts, Release.parse(verdict.version), args.target)
    speculative = serving["vllm"]["speculative_config"] if serving["vllm"] else None
    calibration = calibration_status(folder, _int_or_none(facts.get("block_size")), speculative)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "draft": str(folder),
        "target": args.target,
        "releases": {v.key: v.version for v in verdicts if v.key != "dspark"},
        "verdicts": [v.to_dict() for v in verdicts],
        "serving": serving,
        "vllm_speculative_config": speculative,
        "nemo": NEMO_NOTE,
        "calibration": calibration.to_dict(),
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        _print_text(payload, verdicts, status_lines(calibration))
    required = ["dspark", *args.require]
    return 0 if all(by_key[key].ok for key in required) else 1
