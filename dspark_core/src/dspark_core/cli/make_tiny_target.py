"""``dspark make-tiny-target DIR``: a tiny local Qwen3 target and tokenizer, for demos and tests.

Wraps :func:`dspark_qwen3.testing.make_tiny_target` (the dspark-qwen3 plugin must be installed).
``--logit-scale`` (default 30) multiplies the output head: a random target's next-token
distributions are nearly uniform, and the scale makes them peaked like a trained model's, so that a
draft trained on it has something to learn and its acceptance visibly rises.
"""

from __future__ import annotations

import argparse

HELP = "write a tiny random Qwen3 target and its tokenizer (needs dspark-qwen3), for demos and tests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="DIR", help="where to save the model and tokenizer")
    parser.add_argument("--num-layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (default 2)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary before special tokens")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE target instead of a dense one")
    parser.add_argument(
        "--logit-scale",
        type=float,
        default=30.0,
        help="multiply the output head by this (default 30: peaked outputs, like a trained model; "
        "1 keeps the plain random model)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from dspark_qwen3.testing import TINY_MASK_TOKEN, make_tiny_target
    except ImportError as exc:
        raise ImportError(
            f"make-tiny-target needs the dspark-qwen3 plugin: pip install dspark-qwen3 ({exc})"
        ) from exc
    path = make_tiny_target(
        args.output_dir,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
        moe=args.moe,
        logit_scale=args.logit_scale,
    )
    print(f"tiny target written to {path} (mask token {TINY_MASK_TOKEN!r})")
    return 0
