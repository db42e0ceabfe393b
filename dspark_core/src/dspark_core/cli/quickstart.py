"""``dspark quickstart [DIR]``: the main job, from nothing to held-out speedup figures.

Installs the shipped pretrained target, answers code prompts from the standard library with it,
trains a draft on the answers and decodes held-out prompts (from files never trained on) with the
draft and with plain decoding, interleaved. Prints tau, accept_rate@k, the speedup and whether the
greedy outputs are identical. A second run reuses every stage whose inputs did not change.
"""

from __future__ import annotations

import argparse

HELP = (
    "the main job: target, code data, a trained draft, then held-out tau and speedup (about 5 min on 2 CPUs)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "output_dir", metavar="DIR", nargs="?", default="runs/quickstart", help="default runs/quickstart"
    )
    parser.add_argument(
        "--train-rows", type=int, default=None, help="training chats to answer (default 1200)"
    )
    parser.add_argument("--heldout-prompts", type=int, default=None, help="held-out prompts (default 40)")
    parser.add_argument("--max-steps", type=int, default=None, help="draft training steps (default 300)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens decoded per held-out prompt (default 128)"
    )
    parser.add_argument("--json", action="store_true", help="print the held-out figures as JSON at the end")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from dspark_core.datagen.code_demo import CodeDemoRecipe
    from dspark_core.quickstart import run_quickstart

    recipe = CodeDemoRecipe()
    if args.train_rows is not None:
        recipe = replace(recipe, num_train=args.train_rows)
    if args.heldout_prompts is not None:
        recipe = replace(recipe, num_heldout=args.heldout_prompts)
    overrides = {"progress": args.progress}
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    figures = run_quickstart(
        args.output_dir,
        data_recipe=recipe,
        training_overrides=overrides,
        max_new_tokens=args.max_new_tokens,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0
