"""Batched speculative decoding against batched plain decoding, by batch size, on the quickstart pair.

    flock /work/heavy.lock python benchmarks/batch_bench.py [--root runs/quickstart] [--batch-sizes 1 4 8 16]

Needs a finished ``dspark quickstart DIR`` (the embedded target and its trained draft). Decodes the
held-out prompts greedily, ``--max-new-tokens`` each, in input order, at most N rows at a time for
each batch size N (waiting prompts join as rows finish; ``--chunks``: fixed batches of N), with
:func:`speculative_generate_batch` and :func:`plain_generate_batch`. Runs are interleaved: for each
repeat and batch size, speculative and plain alternate which goes first. Prints, per batch size, the
wall time of the whole prompt set (median and min-max over repeats), the speedups, tau and where the
time went, and counts the outputs identical to batch-1 plain decoding. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dspark_core.decoding import (
    ConfidenceSchedule,
    combine_metrics,
    plain_generate_batch,
    speculative_generate_batch,
)


def load(root: Path) -> tuple[Any, Any, list[torch.Tensor], Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.loading import load_draft
    from dspark_core.quickstart import QuickstartPaths, heldout_prompts

    paths = QuickstartPaths(root)
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    draft = load_draft(paths.draft, target).eval()
    prompts = [p[0] for p in heldout_prompts(paths, tokenizer)]
    eos = target.generation_config.eos_token_id
    return target, draft, prompts, tokenizer.eos_token_id if eos is None else eos


def run(
    kind: str, target: Any, draft: Any, prompts: list[torch.Tensor], size: int, args: Any, eos: Any
) -> dict[str, Any]:
    outputs: list[list[int]] = []
    metrics = []
    began = time.perf_counter()
    # --chunks: fixed batches of `size` prompts; otherwise one call, at most `size` rows at a time,
    # waiting prompts joining as rows finish.
    step = size if args.chunks else len(prompts)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "eos_token_id": eos}
    if not args.chunks:
        options["max_batch_size"] = size
    with torch.inference_mode():
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            if kind == "dspark":
                results = speculative_generate_batch(
                    target,
                    draft,
                    chunk,
                    check_fit=False,
                    proposal_length=args.proposal_length,
                    schedule=args.schedule,
                    **options,
                )
            else:
                results = plain_generate_batch(target, chunk, **options)
            outputs.extend(r.new_tokens for r in results)
            metrics.extend(r.metrics for r in results)
    wall = time.perf_counter() - began
    pooled = combine_metrics(metrics)
    return {"wall": wall, "outputs": outputs, "metrics": pooled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out prompts only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--chunks", action="store_true", help="fixed batches instead of joining rows")
    parser.add_argument("--proposal-length", type=int, default=None)
    parser.add_argument("--schedule", type=ConfidenceSchedule.parse, default=None, help="e.g. product:0.3")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target, draft, prompts, eos = load(args.root)
    prompts = prompts[: args.limit]
    schedule = args.schedule.describe() if args.schedule else "off"
    print(
        f"{len(prompts)} held-out prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
        "greedy, "
        f"{args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
        f"{'fixed batches' if args.chunks else 'rows join as others finish'}, proposal length "
        f"{args.proposal_length or 'block size'}, schedule {schedule}"
    )
    walls: dict[tuple[str, int], list[float]] = {}
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for index, size in enumerate(args.batch_sizes):
            order = ["dspark", "plain"] if (repeat + index) % 2 == 0 else ["plain", "dspark"]
            for kind in order:
                result = run(kind, target, draft, prompts, size, args, eos)
                walls.setdefault((kind, size), []).append(result["wall"])
                last[(kind, size)] = result
                print(f"  repeat {repeat} batch {size:>2} {kind:<6} {result['wall']:7.1f} s", flush=True)

    reference = last[("plain", 1)]["outputs"] if ("plain", 1) in last else None
    base = statistics.median(walls[("dspark", 1)]) if ("dspark", 1) in walls else None
    rows = []
    header = (
        f"{'batch':>5} | {'dspark s (min-max)':>20} | {'plain s (min-max)':>20} | {'vs plain':>8} | "
        f"{'vs b=1':>6} | {'tau':>5} | {'tok/s':>6} | {'target/draft/other s':>20} | identical"
    )
    print(header)
    print("-" * len(header))
    for size in args.batch_sizes:
        spec, plain = walls[("dspark", size)], walls[("plain", size)]
        m = last[("dspark", size)]["metrics"]
        spec_median, plain_median = statistics.median(spec), statistics.median(plain)
        other = last[("dspark", size)]["wall"] - m.target_time_s - m.draft_time_s
        identical = "-"
        if reference is not None:
            same = sum(a == b for a, b in zip(last[("dspark", size)]["outputs"], reference, strict=True))
            same_plain = sum(a == b for a, b in zip(last[("plain", size)]["outputs"], reference, strict=True))
            identical = f"{same}/{len(reference)} (plain {same_plain})"
        row = {
            "batch_size": size,
            "dspark_wall_s": spec,
            "plain_wall_s": plain,
            "speedup_vs_plain": plain_median / spec_median,
            "time_vs_batch1": spec_median / base if base else None,
            "tau_pooled": m.tau,
            "tokens_per_s": m.new_tokens / spec_median,
            "target_s": m.target_time_s,
            "draft_s": m.draft_time_s,
            "other_s": other,
            "identical_to_batch1_plain": identical,
        }
        rows.append(row)
        print(
            f"{size:>5} | {spec_median:7.1f} ({min(spec):5.1f}-{max(spec):5.1f}) | "
            f"{plain_median:7.1f} ({min(plain):5.1f}-{max(plain):5.1f}) | {row['speedup_vs_plain']:7.2f}x | "
            f"{(row['time_vs_batch1'] or float('nan')):6.2f} | {m.tau:5.2f} | {row['tokens_per_s']:6.1f} | "
            f"{m.target_time_s:6.1f}/{m.draft_time_s:5.1f}/{other:5.1f} | {identical}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
