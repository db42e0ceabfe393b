"""Confidence schedules side by side on the quickstart pair: none, position:0.5, product:0.3 and cost.

    flock /work/heavy.lock python benchmarks/schedule_bench.py [--root runs/quickstart] [--threads 1]

1. Calibration: the STS temperatures are fitted on a slice of the quickstart's *training* prompts
   (``data/train.jsonl``, never the held-out ones), one fit per decoding temperature (T=0 and T=1),
   with the schedule off so every drafted slot is verified. The per-position table (samples, ECE of
   the running product, Brier, AUROC, before/after) is printed for the fitting slice and, with the
   same temperatures, for the held-out rounds of the no-schedule runs.
2. The cost table of this machine is loaded or profiled (``dspark_core.decoding.costs``).
3. Each of the 40 held-out prompts is decoded plainly and with each schedule, back to back in a
   rotating order, at T=0 and T=1 (seed = prompt index for every method). Reported per method:
   tokens/s as a ratio to plain (median of per-prompt ratios with min-max, and pooled: all tokens
   over all seconds), tau (tokens committed per verify round), mean proposal length, verify tokens
   fed per committed token, and at T=0 the outputs identical to plain.

Prints tables and writes ``--out`` (JSON); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.calibration.calibrate import calibrate_records, collect_records, table_lines
from dspark_core.calibration.metrics import position_figures
from dspark_core.calibration.records import CalibrationRecords
from dspark_core.decoding import (
    ConfidenceSchedule,
    SpeculativeMetrics,
    combine_metrics,
    plain_generate,
    speculative_generate,
)
from dspark_core.decoding.costs import default_cache_dir, load_or_profile_costs
from dspark_core.loading import load_draft
from dspark_core.training.data import encode_prompt, prompt_turns, read_jsonl

STATIC = ("off", "position:0.5", "product:0.3")


def read_prompts(path: Path, tokenizer: Any, start: int, count: int) -> list[torch.Tensor]:
    prompts = []
    for index, row in enumerate(read_jsonl(path)):
        if index < start:
            continue
        turns = prompt_turns(row.messages)  # type: ignore[union-attr]
        prompts.append(torch.tensor([encode_prompt(tokenizer, turns)], dtype=torch.long))
        if len(prompts) == count:
            break
    return prompts


def verify_tokens_per_committed(metrics: SpeculativeMetrics) -> float:
    fed = sum(metrics.proposed_per_round) + metrics.rounds
    return fed / sum(metrics.committed_per_round)


def run_temperature(
    target: Any,
    draft: Any,
    prompts: list[torch.Tensor],
    schedules: dict[str, ConfidenceSchedule],
    args: Any,
    temperature: float,
) -> tuple[dict[str, dict[str, Any]], CalibrationRecords]:
    """Every prompt with plain decoding and every schedule, rotating the order; returns the figures and
    the calibration records of the no-schedule runs (held-out rounds)."""
    methods = ["plain", *schedules]
    per_prompt: dict[str, list[SpeculativeMetrics]] = {m: [] for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    heldout = CalibrationRecords(block_size=int(draft.config.block_size))
    options = {"max_new_tokens": args.max_new_tokens, "temperature": temperature, "eos_token_id": args.eos}
    # One untimed warm-up of each path.
    plain_generate(target, prompts[0], seed=0, **{**options, "max_new_tokens": 4})
    for schedule in schedules.values():
        speculative_generate(
            target, draft, prompts[0], seed=0, schedule=schedule, **{**options, "max_new_tokens": 4}
        )
    for index, prompt in enumerate(prompts):
        shift = index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            if method == "plain":
                result = plain_generate(target, prompt, seed=index, **options)
            else:
                on_round = heldout.add_round if method == "off" else None
                result = speculative_generate(
                    target, draft, prompt, seed=index, schedule=schedules[method], on_round=on_round,
                    check_fit=False, **options,
                )  # fmt: skip
            per_prompt[method].append(result.metrics)
            outputs[method].append(result.new_tokens)
        print(f"  T={temperature:g}: prompt {index + 1}/{len(prompts)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    plain_all = combine_metrics(per_prompt["plain"])
    figures: dict[str, dict[str, Any]] = {}
    for method in methods:
        pooled = combine_metrics(per_prompt[method])
        ratios = [
            m.tokens_per_s / p.tokens_per_s
            for m, p in zip(per_prompt[method], per_prompt["plain"], strict=True)
        ]
        figures[method] = {
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "speedup_pooled": pooled.tokens_per_s / plain_all.tokens_per_s,
            "tau": pooled.tau,
            "mean_proposal_length": pooled.mean_proposal_length,
            "verify_tokens_per_committed": verify_tokens_per_committed(pooled),
            "identical_to_plain": sum(o == p for o, p in zip(outputs[method], outputs["plain"], strict=True)),
            "tokens_per_s": pooled.tokens_per_s,
        }
    return figures, heldout


def print_methods(temperature: float, figures: dict[str, dict[str, Any]], prompts: int) -> None:
    print(
        f"\nT={temperature:g}, {prompts} held-out prompts "
        "(ratios to plain decoding, same prompts, interleaved):"
    )
    header = (
        "| schedule | speedup median (min-max) | speedup pooled | tau | mean l | verify tokens / committed |"
    )
    print(header + (" identical |" if temperature == 0 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if temperature == 0 else ""))
    for method, f in figures.items():
        if method == "plain":
            continue
        row = (
            f"| {method} | {f['speedup_median']:.2f}x ({f['speedup_min']:.2f}-{f['speedup_max']:.2f}) | "
            f"{f['speedup_pooled']:.2f}x | {f['tau']:.2f} | {f['mean_proposal_length']:.2f} | "
            f"{f['verify_tokens_per_committed']:.2f} |"
        )
        if temperature == 0:
            row += f" {f['identical_to_plain']}/{prompts} |"
        print(row)
    print(f"plain decoding: {figures['plain']['tokens_per_s']:.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("/work/runs/quickstart"))
    parser.add_argument("--calibration-prompts", type=int, default=80, help="training prompts to fit STS on")
    parser.add_argument("--heldout-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None, help="cost table cache (default: dspark's)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.root / "target")
    target = AutoModelForCausalLM.from_pretrained(args.root / "target", dtype=torch.float32).eval()
    draft = load_draft(args.root / "run" / "draft", target).eval()
    eos = target.generation_config.eos_token_id
    args.eos = eos if eos is not None else tokenizer.eos_token_id
    data = args.root / "data"
    calibration_prompts = read_prompts(data / "train.jsonl", tokenizer, 0, args.calibration_prompts)
    heldout_prompts = read_prompts(data / "heldout.jsonl", tokenizer, 0, args.heldout_prompts)

    table, reused = load_or_profile_costs(target, draft, cache_dir=args.cache_dir or default_cache_dir())
    print(f"cost table ({'reused' if reused else 'profiled'}, {table.key.device}, {table.key.dtype}):")
    print(f"  draft proposal {table.draft_s * 1e3:.2f} ms; verify of l+1 tokens, l=0..: "
          + " ".join(f"{v * 1e3:.2f}" for v in table.verify_s) + " ms")  # fmt: skip

    report: dict[str, Any] = {"cost_table": table.as_dict(), "temperatures": {}}
    with torch.inference_mode():
        for temperature in args.temperatures:
            records = collect_records(
                target, draft, calibration_prompts, max_new_tokens=args.max_new_tokens,
                temperatures=[temperature], seed=10_000, eos_token_id=args.eos,
            )  # fmt: skip
            calibration = calibrate_records(records)
            temps = calibration.fit.temperatures
            print(f"\nSTS at T={temperature:g}, fitted on {len(calibration_prompts)} training prompts "
                  f"({calibration.rounds} rounds; the held-out prompts are disjoint):")  # fmt: skip
            print("\n".join(table_lines(calibration)))
            schedules = {name: ConfidenceSchedule.parse(name) for name in STATIC}
            schedules["cost"] = ConfidenceSchedule(
                "cost", temperatures=temps, round_seconds=table.round_seconds()
            )
            figures, heldout = run_temperature(target, draft, heldout_prompts, schedules, args, temperature)
            before = position_figures(heldout, [1.0] * heldout.block_size)
            after = position_figures(heldout, temps)
            print(f"\nheld-out running-product calibration at T={temperature:g} "
                  f"({len(heldout.samples)} rounds of the no-schedule runs, temperatures from the training "
                  "slice):")  # fmt: skip
            print("| pos | samples | observed | ECE raw | ECE STS | Brier raw | Brier STS | AUROC |")
            print("|---|---|---|---|---|---|---|---|")
            for b, a in zip(before, after, strict=True):
                auc = "-" if a.auroc is None else f"{a.auroc:.3f}"
                print(f"| {b.position} | {b.samples} | {b.accept_rate:.3f} | {b.ece:.3f} | {a.ece:.3f} | "
                      f"{b.brier:.3f} | {a.brier:.3f} | {auc} |")  # fmt: skip
            print_methods(temperature, figures, len(heldout_prompts))
            report["temperatures"][str(temperature)] = {
                "sts_temperatures": list(temps),
                "fit": {"before": [f.as_dict() for f in calibration.before],
                        "after": [f.as_dict() for f in calibration.after]},
                "heldout": {"before": [f.as_dict() for f in before], "after": [f.as_dict() for f in after]},
                "methods": figures,
            }  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
