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
    parser.add_argument(
        "--schedule",
        default="off",
        help="confidence schedule: off, position:T (per-slot threshold) or product:T (running product)",
    )
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
        "--baseline", action="store_true", help="also decode plainly with the target and report the speedup"
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
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype; auto is bfloat16 on CUDA and float32 elsewhere",
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


def _resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


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
    if math.isnan(plain.tokens_per_s) or plain.tokens_per_s <= 0:
        return None
    return spec.tokens_per_s / plain.tokens_per_s


def _print_summary(spec: SpeculativeMetrics, plain: SpeculativeMetrics | None) -> None:
    rows: list[tuple[str, str, str]] = [
        ("prompts", str(spec.generations), str(plain.generations) if plain else ""),
        ("new tokens", str(spec.new_tokens), str(plain.new_tokens) if plain else ""),
        ("target forwards", str(spec.target_forwards), str(plain.target_forwards) if plain else ""),
        ("verify rounds", str(spec.rounds), ""),
        ("tau (tokens/round)", _fmt(spec.tau), ""),
        ("mean proposal length", _fmt(spec.mean_proposal_length), ""),
        ("accept_rate@0..", _rates(spec), ""),
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
        rows.append(("speedup", _fmt(_speedup(spec, plain)) + "x", ""))
    header = ("metric", "speculative", "baseline" if plain else "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts) if args.prompts is not None else [Prompt(args.prompt, "--prompt")]

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.decoding import ConfidenceSchedule, combine_metrics, plain_generate, speculative_generate
    from dspark_core.decoding.speculative import check_draft_fits_target
    from dspark_core.errors import DSparkError
    from dspark_core.model_dirs import architectures_of, check_fits_positions, require_model_dir
    from dspark_core.modeling.draft import DSparkDraftModel
    from dspark_core.registry import resolve_dspark_draft_spec

    schedule = ConfidenceSchedule.parse(args.schedule)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device, dtype = _resolve_device_dtype(args.device, args.dtype)

    target_dir = require_model_dir(args.target, "--target")
    draft_dir = require_model_dir(args.draft, "--draft")
    target: Any = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype)
    target = target.to(device).eval()
    architectures = architectures_of(target.config, target_dir / "config.json") or [type(target).__name__]
    draft_cls: Any = resolve_dspark_draft_spec(architectures).draft_cls
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if isinstance(draft_cls, type) and issubclass(draft_cls, DSparkDraftModel):
        # Attaches the target's embeddings and lm_head when the checkpoint omits them.
        load_kwargs["target"] = target
    try:
        draft = draft_cls.from_pretrained(draft_dir, **load_kwargs).to(device).eval()
    except (DSparkError, OSError, ValueError):
        raise
    except Exception as exc:  # e.g. SafetensorError on a truncated file
        raise DSparkError(
            f"--draft {draft_dir}: cannot load its weights ({type(exc).__name__}: {exc}); the files are "
            "truncated or corrupt: export the draft again (dspark verify RUN checks a run's export)"
        ) from exc
    check_draft_fits_target(draft, target)
    tokenizer = AutoTokenizer.from_pretrained(args.target) if _has_tokenizer(args.target) else None
    use_template = not args.no_chat_template
    encoded = [_encode(prompt, tokenizer, use_template) for prompt in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if ids.shape[1] == 0:
            raise ValueError(f"{prompt.source}: the prompt is empty")
        check_fits_positions(ids.shape[1], args.max_new_tokens, target.config, prompt.source)

    sampling: dict[str, Any] = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "eos_token_id": args.eos_token_id,
    }
    spec_options: dict[str, Any] = {"schedule": schedule, "proposal_length": args.proposal_length}
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
    progress = tqdm(
        list(zip(prompts, encoded, strict=True)), desc="prompts", unit="prompt", file=sys.stderr, leave=False
    )
    for index, (prompt, ids) in enumerate(progress):
        result = speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            check_fit=False,
            **sampling,
            **spec_options,
        )
        spec_metrics.append(result.metrics)
        record = _record(index, prompt, result, tokenizer)
        if args.baseline:
            plain = plain_generate(
                target, ids, max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling
            )
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

    spec_total = combine_metrics(spec_metrics)
    plain_total = combine_metrics(plain_metrics) if plain_metrics else None
    if args.json:
        payload: dict[str, Any] = {
            "target": str(args.target),
            "draft": str(args.draft),
            "settings": {
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
                "seed": args.seed,
                "schedule": schedule.describe(),
                "proposal_length": args.proposal_length or int(draft.config.block_size),
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
            },
            "results": records,
            "summary": {
                "speculative": spec_total.as_dict(),
                "baseline": plain_total.as_dict() if plain_total else None,
                "speedup": _speedup(spec_total, plain_total) if plain_total else None,
            },
        }
        print(json.dumps(payload, indent=2))
        return 0
    print()
    _print_summary(spec_total, plain_total)
    return 0


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
        f"--- {metrics['new_tokens']} tokens, {metrics['rounds']} rounds, tau {_fmt(metrics['tau'])}, "
        f"accept_rate@0.. {rates}, {_fmt(metrics['tokens_per_s'], '.1f')} tok/s"
    )
    if "baseline" in record:
        baseline = record["baseline"]["metrics"]
        line += (
            f" (baseline {_fmt(baseline['tokens_per_s'], '.1f')} tok/s, speedup {_fmt(record['speedup'])}x)"
        )
    print(line)
