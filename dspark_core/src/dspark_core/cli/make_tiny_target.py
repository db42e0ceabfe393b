"""``dspark make-tiny-target DIR``: the embedded target, built locally with nothing downloaded.

Three kinds, from the most useful to the fastest:

- default: the pretrained Qwen3 code model that ships with dspark-core (12 layers, hidden 128, its
  own 4k BPE and chat template), trained on the Python standard library by
  ``scripts/build_shipped_target.py``. Copied and hash-verified, in a second.
- ``--pretrain``: the same recipe run here, for any ``--family`` a plugin provides
  (``--steps`` shortens it; the full recipe takes about 20 minutes on two cores).
- ``--random``: a tiny random network whose output head is scaled by ``--logit-scale`` (default
  30) so it is peaked like a trained model: for fast unit tests, not for judging a draft.

A repeat call with the same arguments reuses the folder.
"""

from __future__ import annotations

import argparse

HELP = "write an embedded target (pretrained code model by default; --pretrain, --random) and its tokenizer"

RANDOM_DEFAULTS = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="DIR", nargs="?", help="where to save the model and tokenizer")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--pretrain", action="store_true", help="pretrain here instead of copying the shipped target"
    )
    kind.add_argument("--random", action="store_true", help="a tiny random target, for fast unit tests")
    parser.add_argument(
        "--family",
        default="qwen3",
        help="the family whose plugin builds the model (default qwen3; see --list-families)",
    )
    parser.add_argument(
        "--list-families", action="store_true", help="list the families plugins provide and exit"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="--pretrain: optimizer steps (default: the full recipe)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    sizes = parser.add_argument_group("sizes (--random defaults: 4 layers, hidden 64, vocab 512)")
    sizes.add_argument("--num-layers", type=int, default=None, help="decoder layers")
    sizes.add_argument("--hidden-size", type=int, default=None, help="hidden size")
    sizes.add_argument("--num-heads", type=int, default=None, help="attention heads")
    sizes.add_argument("--num-kv-heads", type=int, default=None, help="key/value heads")
    sizes.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary before special tokens")
    parser.add_argument("--moe", action="store_true", help="--random: shorthand for --family qwen3-moe")
    parser.add_argument(
        "--logit-scale", type=float, default=30.0, help="--random: multiply the output head (default 30)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _sizes(args: argparse.Namespace, defaults: dict[str, int]) -> dict[str, int]:
    return {
        key: value if (value := getattr(args, key)) is not None else default
        for key, default in defaults.items()
    }


def _run_random(args: argparse.Namespace) -> int:
    from dspark_core.targets.build import make_random_target

    sizes = _sizes(args, RANDOM_DEFAULTS)
    vocab_size = sizes.pop("vocab_size")
    family = "qwen3-moe" if args.moe else args.family
    path = make_random_target(
        args.output_dir,
        family=family,
        vocab_size=vocab_size,
        seed=args.seed,
        logit_scale=args.logit_scale,
        **sizes,
    )
    print(
        f"random {family} target written to {path} (mask token '<|reserved_0|>'; "
        "for tests, not for judging drafts)"
    )
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dspark_core.targets.build import PretrainedTargetSpec, make_pretrained_target, with_recipe

    base = PretrainedTargetSpec()
    sizes = _sizes(
        args,
        {
            "num_layers": base.num_layers,
            "hidden_size": base.hidden_size,
            "num_heads": base.num_heads,
            "num_kv_heads": base.num_kv_heads,
            "vocab_size": base.bpe_vocab_size,
        },
    )
    spec = replace(
        with_recipe(base, steps=args.steps or base.recipe.steps, seed=args.seed),
        family=args.family,
        bpe_vocab_size=sizes["vocab_size"],
        num_layers=sizes["num_layers"],
        hidden_size=sizes["hidden_size"],
        num_heads=sizes["num_heads"],
        num_kv_heads=sizes["num_kv_heads"],
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=spec.recipe.steps, desc="pretrain", unit="step", disable=not args.progress, dynamic_ncols=True
    )

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    path, record, reused = make_pretrained_target(args.output_dir, spec, on_step=on_step)
    bar.close()
    verb = "reused" if reused else "pretrained"
    print(f"{verb} {spec.family} target in {path}: held-out perplexity {record['heldout_perplexity']}")
    return 0


def _run_shipped(args: argparse.Namespace) -> int:
    from dspark_core.errors import DSparkError
    from dspark_core.targets.shipped import install_shipped_target

    if args.family != "qwen3" or any(getattr(args, key) is not None for key in RANDOM_DEFAULTS) or args.steps:
        raise DSparkError(
            "the shipped target is a fixed qwen3 model; add --pretrain to build one with other "
            "--family, sizes or --steps (or --random for a test target)"
        )
    path, record, reused = install_shipped_target(args.output_dir)
    corpus = record.get("corpus", {})
    print(
        f"{'reused' if reused else 'installed'} the pretrained qwen3 target in {path}: held-out perplexity "
        f"{record.get('heldout_perplexity')} on {corpus.get('num_heldout_files')} held-out files of "
        "the Python "
        f"{corpus.get('python_version')} standard library"
    )
    return 0


def _list_families() -> int:
    from dspark_core.targets.builders import tiny_target_builders

    builders = tiny_target_builders()
    if not builders:
        print("no plugin provides tiny-target builders (install one, e.g. pip install dspark-qwen3)")
        return 1
    for family, (plugin, builder) in sorted(builders.items()):
        print(f"{family:<14} {plugin:<20} {builder if isinstance(builder, str) else builder.__qualname__}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_families:
        return _list_families()
    if not args.output_dir:
        from dspark_core.errors import DSparkError

        raise DSparkError("make-tiny-target needs DIR, the folder to write the target into")
    if args.random or args.moe:
        return _run_random(args)
    if args.pretrain:
        return _run_pretrain(args)
    return _run_shipped(args)
