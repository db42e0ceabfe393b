"""``dspark calibrate``: fit STS temperatures for a draft's confidence head on held-out prompts.

Decodes the prompts of ``--data`` (chat rows; the turns before the first assistant turn are the
prompt) with the schedule off, records each verify round's raw confidence logits and accepted count,
fits one temperature per position and writes ``sts.json`` (the file SGLang's
``--speculative-dspark-confidence-sts-path`` reads) and ``dspark_calibration.json`` into ``--out``
(default: the draft folder, where ``dspark check-draft`` and ``--schedule cost`` look for it).

This module imports neither torch nor transformers until :func:`run` is called.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "fit per-position STS temperatures for the draft's confidence head (writes sts.json for SGLang)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target model (a local HF checkpoint folder)")
    parser.add_argument("--draft", required=True, help="the DSpark draft checkpoint folder")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="held-out chat jsonl (rows with `messages`), disjoint from the data you will evaluate on",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the draft folder)")
    parser.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[0.0],
        help="decoding temperature(s) to calibrate at, pooled (default 0: greedy); use your serving one",
    )
    parser.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt")
    parser.add_argument("--bins", type=int, default=15, help="equal-width bins of the ECE")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16"
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="reliability diagram per position")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _check(args: argparse.Namespace) -> None:
    if not args.data.is_file():
        raise ValueError(f"--data {args.data}: no such file")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be at least 1, got {args.max_prompts}")
    if args.max_new_tokens < 2:
        raise ValueError(
            f"--max-new-tokens must be at least 2 (a verify round needs one), got {args.max_new_tokens}"
        )
    if not 2 <= args.bins <= 1000:
        raise ValueError(f"--bins must lie in [2, 1000], got {args.bins}")
    for temperature in args.temperature:
        if not temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {temperature}")


def read_prompts(path: Path, tokenizer: Any, limit: int | None) -> list[Any]:
    """The prompt ids of the chat rows in ``path`` (``[1, P]`` tensors)."""
    import torch

    from dspark_core.training.data import DatasetError, encode_prompt, prompt_turns, read_jsonl

    prompts = []
    for row in read_jsonl(path):
        messages = getattr(row, "messages", None)
        if messages is None:
            raise DatasetError(f"{row.origin}: calibration prompts must be chat rows with `messages`")
        turns = prompt_turns(messages)
        if not any(m["role"] == "user" for m in turns):
            continue
        prompts.append(torch.tensor([encode_prompt(tokenizer, turns)], dtype=torch.long))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise DatasetError(f"{path}: no chat row with a user turn to calibrate on")
    return prompts


def run(args: argparse.Namespace) -> int:
    _check(args)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.calibration.calibrate import (
        DISJOINT_NOTE,
        calibrate_records,
        collect_records,
        fingerprint,
        table_lines,
        write_calibration,
    )
    from dspark_core.loading import load_draft
    from dspark_core.model_dirs import require_model_dir
    from dspark_core.options import canonical_precision, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(canonical_precision(args.dtype, error=ValueError), device)
    target_dir = require_model_dir(args.target, "--target")
    draft_dir = require_model_dir(args.draft, "--draft")
    # The data is checked before the models load, so a bad file fails fast.
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = read_prompts(args.data, tokenizer, args.max_prompts)
    target: Any = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype)
    target = target.to(device).eval()
    draft = load_draft(draft_dir, target, dtype=dtype)
    eos = target.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    total = len(prompts) * len(args.temperature)
    bar = tqdm(total=total, desc="calibration decoding", unit="prompt", file=sys.stderr, disable=args.json)
    records = collect_records(
        target,
        draft,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperatures=args.temperature,
        seed=args.seed,
        eos_token_id=eos,
        on_prompt=lambda _: bar.update(),
    )
    bar.close()
    calibration = calibrate_records(records, args.bins)
    settings = {
        "temperatures": list(args.temperature),
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts),
        "seed": args.seed,
        "bins": args.bins,
        "dtype": str(dtype).removeprefix("torch."),
    }
    out_dir = args.out if args.out is not None else Path(draft_dir)
    sts_path, report_path = write_calibration(
        out_dir,
        calibration,
        dataset=args.data.name,
        draft_dir=Path(draft_dir),
        data_fingerprint=fingerprint(prompts, settings),
        settings=settings,
    )
    plot_path = None
    if args.plot is not None:
        from dspark_core.calibration.plot import plot_reliability

        plot_path = plot_reliability(records, calibration.fit.temperatures, args.plot, args.bins)
    if args.json:
        print(
            json.dumps(
                {"sts": str(sts_path), **json.loads(report_path.read_text(encoding="utf-8"))}, indent=2
            )
        )
        return 0
    print(f"{calibration.rounds} verify rounds from {len(prompts)} prompts of {args.data}")
    print("running product of sigmoid(c_k / T_k) against 'accepted > k', per position:")
    print("\n".join(table_lines(calibration)))
    print(f"wrote {sts_path} (SGLang: --speculative-dspark-confidence-sts-path) and {report_path}")
    if plot_path is not None:
        print(f"reliability diagrams written to {plot_path}")
    print(f"note: {DISJOINT_NOTE}")
    return 0
