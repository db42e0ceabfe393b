"""``dspark generate``: speculative generation with a target and its DSpark draft, with metrics.

Prompts come from ``--prompt`` or a ``--prompts`` jsonl file of ``{"turns": [str, ...]}`` records
(the DSpark paper's evaluation format; the first turn is the prompt). With a tokenizer at the
target path the prompt is text (wrapped in the chat template when there is one) and the output is
decoded; without one, a prompt is a whitespace-separated list of token ids.

This module imports neither torch nor transformers until :func:`run` is called.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dspark_core.decoding import GenerationResult, SpeculativeMetrics

HELP = "generate with a target and its DSpark draft (speculative decoding) and report tau and speed"

#: Files that mean "there is a tokenizer here".
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WARMUP_TOKENS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target model (a local HF checkpoint folder)")
    parser.add_argument("--draft", required=True, help="the DSpark draft checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument(
        "--prompts", type=Path, help='a jsonl file of {"turns": [str, ...]}; the first turn is the prompt'
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter (draft and target alike)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus filter (draft and target alike)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (the same for the baseline)")
    from dspark_core.decoding.schedule import describe_schedules

    parser.add_argument("--schedule", default="off", help=f"confidence schedule: {describe_schedules()}")
    parser.add_argument(
        "--proposal-length", type=int, default=None, help="slots drafted per round, 1..block_size"
    )
    parser.add_argument(
        "--eos-token-id",
        type=int,
        action="append",
        default=None,
        help="stop token (repeatable); default: the target's generation config",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also decode each prompt plainly (alternating which goes first) and report speedup_pooled and "
        "speedup_median",
    )
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16 "
        "(float32/bfloat16/float16 also accepted). Greedy output is token-exact in fp32 only: in bf16 "
        "the chunked verify and one-token forwards round differently at near-ties",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="run both models in fp32, so greedy speculative output equals plain greedy token for token",
    )
    parser.add_argument(
        "--allow-family-mismatch",
        action="store_true",
        help="load a draft whose architectures/model_type name another family than the target's "
        "(refused by default: it loads with the wrong layers)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw per-position acceptance and the accepted-length distribution over all prompts (needs "
        "the plot extra: pip install 'dspark-core[plot]')",
    )


@dataclass(frozen=True)
class Prompt:
    """One prompt and where it came from."""

    text: str
    source: str


def read_prompts(path: Path) -> list[Prompt]:
    """Parse a ``{"turns": [str, ...]}`` jsonl file; blank lines are skipped.

    Raises:
        ValueError: naming the file and line of a malformed record, or when the file has no records.
    """
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            turns = record.get("turns") if isinstance(record, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(
                    f'{where}: expected an object {{"turns": [str, ...]}} with at least one turn'
                )
            prompts.append(Prompt(turns[0], where))
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def _has_tokenizer(target: str) -> bool:
    folder = Path(target)
    return folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from dspark_core.options import canonical_precision, resolve_device, resolve_dtype

    precision = canonical_precision(args.dtype, error=ValueError)
    device = resolve_device(args.device)
    if args.exact:
        if precision not in ("auto", "fp32"):
            raise ValueError(f"--exact runs in fp32 and cannot be combined with --dtype {args.dtype}")
        precision = "fp32"
    return device, resolve_dtype(precision, device)


def _encode(prompt: Prompt, tokenizer: Any, use_template: bool) -> torch.Tensor:
    import torch

    if tokenizer is None:
        try:
            token_ids = [int(token) for token in prompt.text.split()]
        except ValueError:
            raise ValueError(
                f"{prompt.source}: the target has no tokenizer, so a prompt must be whitespace-separated "
                "token ids"
            ) from None
        return torch.tensor([token_ids], dtype=torch.long)
    if use_template and getattr(tokenizer, "chat_template", None):
        from dspark_core.training.data import encode_prompt

        conversation = [{"role": "user", "content": prompt.text}]
        return torch.tensor([encode_prompt(tokenizer, conversation)], dtype=torch.long)
    encoded = tokenizer(prompt.text, add_special_tokens=True, return_tensors="pt")
    ids: torch.Tensor = encoded["input_ids"]
    return ids


def _decode(tokens: list[int], tokenizer: Any) -> str | None:
    return None if tokenizer is None else str(tokenizer.decode(tokens, skip_special_tokens=True))


def _rates(metrics: SpeculativeMetrics) -> str:
    rates = metrics.accept_rates()
    return " ".join("-" if r is None else f"{r:.2f}" for r in rates) or "-"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _speedup(spec: SpeculativeMetrics, plain: SpeculativeMetrics) -> float | None:
    """``speedup_pooled`` of these metrics (one prompt's, or every prompt's combined)."""
    from dspark_core.decoding import figures

    ratio = figures.throughput_ratio(spec.new_tokens, spec.total_time_s, plain.new_tokens, plain.total_time_s)
    return ratio if math.isfinite(ratio) else None


def _speedup_median(records: list[dict[str, Any]]) -> tuple[float, float, float] | None:
    """``speedup_median`` (median, min, max) over the prompts' own ratios."""
    from dspark_core.decoding import figures

    ratios = [r["speedup"] for r in records if r.get("speedup") is not None]
    return figures.speedup_median(ratios) if ratios else None


def _print_summary(
    spec: SpeculativeMetrics, plain: SpeculativeMetrics | None, median: tuple[float, float, float] | None
) -> None:
    rows: list[tuple[str, str, str]] = [
        ("prompts", str(spec.generations), str(plain.generations) if plain else ""),
        ("new tokens", str(spec.new_tokens), str(plain.new_tokens) if plain else ""),
        ("target forwards", str(spec.target_forwards), str(plain.target_forwards) if plain else ""),
        ("verify rounds", str(spec.rounds), ""),
        ("tau_pooled (tokens/verify round)", _fmt(spec.tau_pooled), ""),
        ("tokens_per_target_forward", _fmt(spec.tokens_per_target_forward), ""),
        ("mean proposal length", _fmt(spec.mean_proposal_length), ""),
        ("accept_rate@k, k=0..", _rates(spec), ""),
        ("draft time (s)", _fmt(spec.draft_time_s, ".3f"), ""),
        (
            "target time (s)",
            _fmt(spec.target_time_s, ".3f"),
            _fmt(plain.target_time_s, ".3f") if plain else "",
        ),
        ("total time (s)", _fmt(spec.total_time_s, ".3f"), _fmt(plain.total_time_s, ".3f") if plain else ""),
        ("tokens/s", _fmt(spec.tokens_per_s, ".1f"), _fmt(plain.tokens_per_s, ".1f") if plain else ""),
    ]
    if plain is not None:
        rows.append(("speedup_pooled", _fmt(_speedup(spec, plain)) + "x", ""))
        if median is not None:
            rows.append(
                ("speedup_median (min-max)", f"{_fmt(median[0])}x ({_fmt(median[1])}-{_fmt(median[2])}x)", "")
            )
    header = ("metric", "speculative", "baseline" if plain else "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _check_arguments(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.proposal_length is not None and args.proposal_length < 1:
        raise ValueError(
            f"--proposal-length must be at least 1, got {args.proposal_length}: every round drafts at least "
            "one slot (plain decoding is `dspark generate --baseline`, or a schedule threshold of 1)"
        )
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: give a .png file name")


def _load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.loading import load_draft
    from dspark_core.model_dirs import require_model_dir, text_config_of

    target_dir = require_model_dir(args.target, "--target")
    target: Any = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype)
    target = target.to(device).eval()
    draft = load_draft(args.draft, target, dtype=dtype, allow_family_mismatch=args.allow_family_mismatch)
    tokenizer = AutoTokenizer.from_pretrained(args.target) if _has_tokenizer(args.target) else None
    vocab = int(text_config_of(target.config).vocab_size)
    for token in args.eos_token_id or []:
        if not 0 <= token < vocab:
            raise ValueError(f"--eos-token-id {token} is outside the target's vocabulary [0, {vocab})")
    return target, draft, tokenizer


def _encode_all(args: argparse.Namespace, prompts: list[Prompt], tokenizer: Any, target: Any) -> list[Any]:
    from dspark_core.model_dirs import check_fits_positions

    encoded = [_encode(prompt, tokenizer, not args.no_chat_template) for prompt in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if ids.shape[1] == 0:
            raise ValueError(f"{prompt.source}: the prompt is empty")
        check_fits_positions(ids.shape[1], args.max_new_tokens, target.config, prompt.source)
    return encoded


def _decode_prompts(
    args: argparse.Namespace, models: tuple[Any, Any, Any], prompts: list[Prompt], encoded: list[Any]
) -> tuple[list[dict[str, Any]], list[SpeculativeMetrics], list[SpeculativeMetrics]]:
    """Each prompt decoded speculatively (and plainly with ``--baseline``); the records and metrics."""
    from tqdm import tqdm

    from dspark_core.decoding import ConfidenceSchedule, plain_generate, speculative_generate

    target, draft, tokenizer = models
    sampling: dict[str, Any] = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "eos_token_id": args.eos_token_id,
    }
    from dspark_core.decoding.costs import prepare_cost_schedule

    # `cost` needs this machine's cost table and the draft folder's calibration (sts.json).
    schedule, args.schedule_info = prepare_cost_schedule(
        ConfidenceSchedule.parse(args.schedule), target, draft, draft_dir=Path(args.draft)
    )
    spec_options = {"schedule": schedule, "proposal_length": args.proposal_length}
    # One short untimed run of each path first, so one-time setup is not billed to the first prompt.
    warmup = min(_WARMUP_TOKENS, args.max_new_tokens)
    speculative_generate(
        target, draft, encoded[0], max_new_tokens=warmup, check_fit=False, seed=0, **sampling
    )
    if args.baseline:
        plain_generate(target, encoded[0], max_new_tokens=warmup, seed=0, **sampling)
    records: list[dict[str, Any]] = []
    spec_metrics: list[SpeculativeMetrics] = []
    plain_metrics: list[SpeculativeMetrics] = []
    pairs = list(zip(prompts, encoded, strict=True))
    progress = tqdm(pairs, desc="prompts", unit="prompt", file=sys.stderr, leave=False)
    for index, (prompt, ids) in enumerate(progress):
        options = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, **sampling}
        # With a baseline, the two methods take turns going first, so machine load falls on both alike.
        plain = plain_generate(target, ids, **options) if args.baseline and index % 2 == 0 else None
        result = speculative_generate(target, draft, ids, check_fit=False, **options, **spec_options)
        spec_metrics.append(result.metrics)
        record = _record(index, prompt, result, tokenizer)
        if args.baseline:
            plain = plain if plain is not None else plain_generate(target, ids, **options)
            plain_metrics.append(plain.metrics)
            record["baseline"] = _record(index, prompt, plain, tokenizer)
            record["speedup"] = _speedup(result.metrics, plain.metrics)
            if args.temperature == 0:
                record["baseline_matches"] = plain.new_tokens == result.new_tokens
        records.append(record)
        if not args.json:
            progress.clear()
            _print_record(record, len(prompts))
            progress.refresh()
    progress.close()
    return records, spec_metrics, plain_metrics


def _exactness_note(
    args: argparse.Namespace, dtype: torch.dtype, records: list[dict[str, Any]]
) -> str | None:
    """What the user should know about greedy exactness in this run, or None when it is not greedy."""
    import torch

    if args.temperature != 0:
        return None
    matched = [r["baseline_matches"] for r in records if "baseline_matches" in r]
    parts = []
    if matched:
        parts.append(f"greedy outputs identical to plain decoding: {sum(matched)}/{len(matched)}")
    if dtype != torch.float32:
        parts.append(
            f"in {str(dtype).removeprefix('torch.')} greedy output may differ from plain greedy at near-ties "
            "(the chunked verify and one-token forwards round differently); --exact verifies in fp32"
        )
    return "; ".join(parts) or None


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts) if args.prompts is not None else [Prompt(args.prompt, "--prompt")]
    _check_arguments(args)
    from dspark_core.decoding import ConfidenceSchedule, combine_metrics, figures

    schedule = ConfidenceSchedule.parse(args.schedule)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device, dtype = _resolve_device_dtype(args)
    models = _load_models(args, device, dtype)
    encoded = _encode_all(args, prompts, models[2], models[0])
    records, spec_metrics, plain_metrics = _decode_prompts(args, models, prompts, encoded)
    spec_total = combine_metrics(spec_metrics)
    plain_total = combine_metrics(plain_metrics) if plain_metrics else None
    note = _exactness_note(args, dtype, records)
    median = _speedup_median(records)
    if args.plot is not None:
        from dspark_core.decoding.plot import plot_acceptance

        plot_acceptance(spec_metrics, args.plot)
    if args.json:
        settings = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "schedule": schedule.describe(),
            "schedule_info": getattr(args, "schedule_info", {}),
            "proposal_length": args.proposal_length or int(models[1].config.block_size),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        summary = {
            "speculative": spec_total.as_dict(),
            "baseline": plain_total.as_dict() if plain_total else None,
            "speedup_pooled": _speedup(spec_total, plain_total) if plain_total else None,
            "speedup_median": median[0] if median else None,
            "speedup_min": median[1] if median else None,
            "speedup_max": median[2] if median else None,
            "definitions": {
                name: figures.DEFINITIONS[name]
                for name in (
                    "tau_pooled",
                    "tokens_per_target_forward",
                    "accept_rate@k",
                    "speedup_pooled",
                    "speedup_median",
                )
            },
            "baseline_matches": _matches(records),
            "note": note,
        }
        payload = {"target": str(args.target), "draft": str(args.draft), "settings": settings}
        print(json.dumps({**payload, "results": records, "summary": summary}, indent=2))
        return 0
    print()
    _print_summary(spec_total, plain_total, median)
    print("tau_pooled: tokens per verify round, the bonus token counted (plain decoding is 1.00)")
    if plain_total is not None:
        print("speedup_pooled: total tokens/s over plain's; speedup_median: the median of per-prompt ratios")
    if note:
        print(f"note: {note}")
    if args.plot is not None:
        print(f"acceptance plot written to {args.plot}")
    return 0


def _matches(records: list[dict[str, Any]]) -> dict[str, int] | None:
    matched = [r["baseline_matches"] for r in records if "baseline_matches" in r]
    return {"identical": sum(matched), "compared": len(matched)} if matched else None


def _record(index: int, prompt: Prompt, result: GenerationResult, tokenizer: Any) -> dict[str, Any]:
    new_tokens = result.new_tokens
    return {
        "index": index,
        "prompt": prompt.text,
        "prompt_tokens": result.metrics.prompt_tokens,
        "text": _decode(new_tokens, tokenizer),
        "token_ids": new_tokens,
        "metrics": result.metrics.as_dict(),
    }


def _print_record(record: dict[str, Any], total: int) -> None:
    metrics = record["metrics"]
    shown = record["text"] if record["text"] is not None else " ".join(map(str, record["token_ids"]))
    print(f"=== [{record['index'] + 1}/{total}] {record['prompt'][:70]!r}")
    print(shown)
    rates = " ".join("-" if r is None else f"{r:.2f}" for r in metrics["accept_rate"]) or "-"
    line = (
        f"--- {metrics['new_tokens']} tokens, {metrics['rounds']} rounds, tau {_fmt(metrics['tau_pooled'])}, "
        f"accept_rate@0.. {rates}, {_fmt(metrics['tokens_per_s'], '.1f')} tok/s"
    )
    if "baseline" in record:
        baseline = record["baseline"]["metrics"]
        line += (
            f" (baseline {_fmt(baseline['tokens_per_s'], '.1f')} tok/s, speedup {_fmt(record['speedup'])}x)"
        )
        if "baseline_matches" in record:
            line += (
                ", identical to plain greedy" if record["baseline_matches"] else ", DIFFERS from plain greedy"
            )
    print(line)
