"""``dspark eval --target T --draft D DATA...``: the paper's Table 1 for a draft, on prompt files.

Each DATA file is one dataset (a column of the table): DeepSpec benchmark files (``{"turns": [...]}``
per line), chat JSONL rows or pre-tokenised rows (see :mod:`dspark_core.evaluation.datasets`).
Prompts are decoded in batches; with ``--baseline`` each batch is also decoded plainly, side by
side, in alternating order. Figures are named and defined in :mod:`dspark_core.decoding.figures`.

This module imports neither torch nor transformers until :func:`run` is called.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "evaluate a draft on benchmark files: tau, per-position acceptance and speedup per dataset (Table 1)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target model (a local HF checkpoint folder)")
    parser.add_argument("--draft", required=True, help="the DSpark draft checkpoint folder")
    parser.add_argument(
        "data",
        nargs="+",
        type=Path,
        metavar="DATA",
        help='JSONL files, one dataset each: {"turns": [str, ...]} (DeepSpec), chat or pre-tokenised rows',
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument(
        "--temperature",
        type=_temperatures,
        action="extend",
        default=None,
        metavar="T[,T...]",
        help="temperatures, comma-separated or repeated, each evaluated in turn (default 0: greedy)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many lines per file")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (batch i uses seed + i; default 0)"
    )
    from dspark_core.decoding.schedule import describe_schedules

    parser.add_argument("--schedule", default="off", help=f"confidence schedule: {describe_schedules()}")
    parser.add_argument(
        "--all-turns",
        action="store_true",
        help="ask every turn, each after the model's own answer to the previous one (default: first turn)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also decode each batch plainly (same batch size, alternating order): speedups, exactness",
    )
    parser.add_argument(
        "--eos-token-id", type=int, action="append", default=None, help="stop token (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="draw accept_rate@k per dataset (needs matplotlib)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16; greedy outputs match plain "
        "decoding token for token in fp32 only",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _temperatures(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, e.g. 0,1; got {text!r}"
        ) from None


def _check(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: give a .png file name")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from dspark_core.evaluation.datasets import read_datasets

    datasets = read_datasets(args.data, limit=args.limit)
    import torch
    from tqdm import tqdm

    from dspark_core.evaluation.report import plot_report
    from dspark_core.evaluation.runner import EvalSettings, evaluate, load_models
    from dspark_core.options import canonical_precision, resolve_device, resolve_dtype

    settings = EvalSettings(
        temperatures=tuple(args.temperature or [0.0]),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        schedule=args.schedule,
        baseline=args.baseline,
        all_turns=args.all_turns,
        eos_token_id=args.eos_token_id,
    )
    settings.check()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(canonical_precision(args.dtype, error=ValueError), device)
    target, draft, tokenizer = load_models(str(args.target), str(args.draft), device=device, dtype=dtype)
    turns = sum(c.num_turns if args.all_turns else 1 for d in datasets for c in d.conversations)
    bar = tqdm(
        total=turns * len(settings.temperatures), desc="eval", unit="prompt", file=sys.stderr,
        disable=not args.progress, dynamic_ncols=True,
    )  # fmt: skip
    with torch.inference_mode():
        report = evaluate(target, draft, tokenizer, datasets, settings, on_request=bar.update)
    bar.close()
    report.settings.update(
        target=str(args.target), draft=str(args.draft), dtype=str(dtype).removeprefix("torch.")
    )
    if args.plot is not None:
        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print("\n".join(report.table_lines()))
    if args.baseline and 0.0 in settings.temperatures and dtype != torch.float32:
        print(
            f"note: in {str(dtype).removeprefix('torch.')} greedy outputs may differ from plain decoding at "
            "near-ties (the chunked verify and one-token forwards round differently); --dtype fp32 is exact"
        )
    if args.plot is not None:
        print(f"acceptance plot written to {args.plot}")
    return 0
