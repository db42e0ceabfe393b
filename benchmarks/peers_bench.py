"""dspark against plain decoding and Hugging Face's own speed-ups, on the quickstart's held-out prompts.

    python benchmarks/peers_bench.py [--root runs/quickstart] [--seeds 0 1 2] [--prompts 24]

Uses (and builds, if missing) the quickstart's target and data, then trains, per seed, a dspark
draft with the default Markov head and one with ``markov_rank=0``, and a standalone assistant LM
for HF assisted generation: a small model of the same family with about the draft's parameter
count and the same tokenizer, trained on the same regenerated chats for the same wall time as the
default draft took. Methods are interleaved prompt by prompt, in rotating order, so machine load
falls on all alike; speed is each method's per-prompt tokens/s over plain decoding's, reported as
a median with min-max. Greedy (T=0) and sampled (T=1) runs. Prints Markdown; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.datagen.code_demo import TRAIN_NAME, build_code_demo_data
from dspark_core.decoding import plain_generate, speculative_generate
from dspark_core.loading import load_draft
from dspark_core.quickstart import TRAINING, QuickstartPaths, heldout_prompts
from dspark_core.targets.builders import TinyTargetShape, build_tiny_model
from dspark_core.targets.pretrain import PretrainRecipe, train_on_stream
from dspark_core.targets.shipped import install_shipped_target
from dspark_core.training.config import TrainConfig
from dspark_core.training.data import encode_prompt, read_jsonl
from dspark_core.training.trainer import train


def train_dspark(
    paths: QuickstartPaths, out: Path, *, markov_rank: int, seed: int, steps: int
) -> tuple[Path, float]:
    """A draft trained like the quickstart's; returns (export dir, wall seconds)."""
    config = TrainConfig.from_mapping(
        {
            **TRAINING,
            "markov_rank": markov_rank,
            "seed": seed,
            "max_steps": steps,
            "target": str(paths.target),
            "data": [str(paths.data / TRAIN_NAME)],
            "output_dir": str(out),
            "overwrite": True,
            "progress": False,
        }
    )
    started = time.perf_counter()
    result = train(config)
    assert result.export_dir is not None
    return result.export_dir, time.perf_counter() - started


def chat_stream(paths: QuickstartPaths, tokenizer: Any) -> torch.Tensor:
    """The regenerated chats as one token stream: prompt, the target's reply ids, end of turn."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens: list[int] = []
    for row in read_jsonl(paths.data / TRAIN_NAME):
        messages = [m.as_dict() for m in row.messages]  # type: ignore[union-attr]
        tokens += encode_prompt(tokenizer, messages[:-1])
        tokens += [*_reply_ids(row, tokenizer, messages[-1]["content"]), im_end, tokenizer.eos_token_id]
    return torch.tensor(tokens, dtype=torch.long)


def _reply_ids(row: Any, tokenizer: Any, text: str) -> list[int]:
    ids = getattr(row.messages[-1], "response_ids", None)
    return list(ids) if ids else tokenizer(text, add_special_tokens=False)["input_ids"]


def train_assistant(paths: QuickstartPaths, tokenizer: Any, target: Any, params: int, seconds: float) -> Any:
    """A standalone small LM of the target's family, sized near ``params``, trained for ``seconds``."""
    shape = TinyTargetShape(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_tiny_model("qwen3", shape, seed=0)
    recipe = PretrainRecipe(steps=100_000, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=20)
    steps, loss = train_on_stream(model, chat_stream(paths, tokenizer), recipe, time_budget_s=seconds)
    count = sum(p.numel() for p in model.parameters())
    print(
        f"assistant LM: {count:,} parameters (draft {params:,}), {steps} steps in {seconds:.0f} s, "
        f"loss {loss:.3f}"
    )
    model.generation_config.eos_token_id = target.generation_config.eos_token_id
    return model.eval()


def hf_method(
    target: Any, **extra: Any
) -> Callable[[torch.Tensor, float, int, int], tuple[list[int], float | None]]:
    def run(
        prompt: torch.Tensor, temperature: float, max_new_tokens: int, seed: int
    ) -> tuple[list[int], float | None]:
        torch.manual_seed(seed)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        out = target.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            eos_token_id=target.generation_config.eos_token_id,
            pad_token_id=target.generation_config.pad_token_id,
            **sampling,
            **extra,
        )
        return [int(t) for t in out[0, prompt.shape[1] :]], None

    return run


def ours(
    target: Any, draft: Any | None
) -> Callable[[torch.Tensor, float, int, int], tuple[list[int], float | None]]:
    eos = list(target.generation_config.eos_token_id)

    def run(
        prompt: torch.Tensor, temperature: float, max_new_tokens: int, seed: int
    ) -> tuple[list[int], float | None]:
        options = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "eos_token_id": eos,
            "seed": seed,
        }
        if draft is None:
            result = plain_generate(target, prompt, **options)
            return result.new_tokens, None
        result = speculative_generate(target, draft, prompt, **options)
        return result.new_tokens, result.metrics.tau

    return run


def cost_ratio(target: Any, draft: Any, prompts: list[torch.Tensor], max_new_tokens: int) -> dict[str, float]:
    """Milliseconds per draft proposal, per verify forward and per one-token target forward."""
    eos = list(target.generation_config.eos_token_id)
    spec = [
        speculative_generate(target, draft, p, max_new_tokens=max_new_tokens, eos_token_id=eos).metrics
        for p in prompts
    ]
    plain = [
        plain_generate(target, p, max_new_tokens=max_new_tokens, eos_token_id=eos).metrics for p in prompts
    ]
    # Prefill is one of the forwards; with 128 new tokens it is a small share of either total.
    costs = {
        "draft_proposal_ms": 1e3 * sum(m.draft_time_s for m in spec) / sum(m.draft_forwards for m in spec),
        "verify_forward_ms": 1e3 * sum(m.target_time_s for m in spec) / sum(m.target_forwards for m in spec),
        "target_token_ms": 1e3 * sum(m.target_time_s for m in plain) / sum(m.target_forwards for m in plain),
    }
    costs["target_token_over_draft_proposal"] = costs["target_token_ms"] / costs["draft_proposal_ms"]
    costs["verify_over_target_token"] = costs["verify_forward_ms"] / costs["target_token_ms"]
    print("costs at batch 1: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    return costs


def measure(
    methods: dict[str, Any], prompts: list[torch.Tensor], temperature: float, max_new_tokens: int
) -> dict[str, Any]:
    names = list(methods)
    rows: dict[str, dict[str, list[Any]]] = {n: {"tps": [], "tau": [], "tokens": []} for n in names}
    for index, prompt in enumerate(prompts):
        rotated = names[index % len(names) :] + names[: index % len(names)]
        for name in rotated:
            started = time.perf_counter()
            tokens, tau = methods[name](prompt, temperature, max_new_tokens, 1000 + index)
            elapsed = time.perf_counter() - started
            rows[name]["tps"].append(len(tokens) / elapsed)
            rows[name]["tau"].append(tau)
            rows[name]["tokens"].append(tokens)
    report = {}
    for name in names:
        ratios = [a / b for a, b in zip(rows[name]["tps"], rows["plain"]["tps"], strict=True)]
        taus = [t for t in rows[name]["tau"] if t is not None]
        same = sum(a == b for a, b in zip(rows[name]["tokens"], rows["plain"]["tokens"], strict=True))
        report[name] = {
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "tau": statistics.mean(taus) if taus else None,
            "identical": same if temperature == 0 else None,
        }
    return report


def print_table(title: str, report: dict[str, Any], prompts: int) -> None:
    print(f"\n{title}\n")
    print("| method | tokens/s vs plain, median (min-max) | tau | greedy output identical |")
    print("|---|---|---|---|")
    for name, r in report.items():
        tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        same = "-" if r["identical"] is None else f"{r['identical']}/{prompts}"
        print(
            f"| {name} | {r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
            f"| {tau} | {same} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts used (default 24)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=TRAINING["max_steps"], help="draft training steps")
    return parser.parse_args()


def train_drafts(
    args: argparse.Namespace, paths: QuickstartPaths, target: Any
) -> tuple[dict[tuple[int, int], Any], list[float]]:
    """One draft per (markov_rank, seed); returns them and the default head's training wall times."""
    drafts: dict[tuple[int, int], Any] = {}
    wall = []
    for seed in args.seeds:
        for rank in (TRAINING["markov_rank"], 0):
            export, seconds = train_dspark(
                paths, args.root / "peers" / f"r{rank}-s{seed}", markov_rank=rank, seed=seed, steps=args.steps
            )
            drafts[(rank, seed)] = load_draft(export, target)
            if rank:
                wall.append(seconds)
            print(f"trained dspark markov_rank={rank} seed={seed} in {seconds:.0f} s")
    return drafts, wall


def print_markov_gains(report: dict[str, Any], seeds: list[int]) -> None:
    gains = []
    for seed in seeds:
        with_head = report[f"dspark r={TRAINING['markov_rank']} seed {seed}"]["tau"]
        without = report[f"dspark r=0 seed {seed}"]["tau"]
        gains.append(with_head / without)
        print(f"  Markov gain seed {seed}: tau {with_head:.3f} / {without:.3f} = {with_head / without:.3f}")
    print(f"  Markov gain, mean of {len(gains)} seeds: {statistics.mean(gains):.3f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    paths = QuickstartPaths(args.root)
    install_shipped_target(paths.target)
    build_code_demo_data(paths.target, paths.data, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    prompts = heldout_prompts(paths, tokenizer)[: args.prompts]

    drafts, wall = train_drafts(args, paths, target)
    first = args.seeds[0]
    params = sum(p.numel() for p in drafts[(TRAINING["markov_rank"], first)].parameters() if p.requires_grad)
    assistant = train_assistant(paths, tokenizer, target, params, statistics.mean(wall))

    results: dict[str, Any] = {}
    with torch.inference_mode():
        results["costs"] = cost_ratio(
            target, drafts[(TRAINING["markov_rank"], first)], prompts[:4], args.max_new_tokens
        )
    for temperature in (0.0, 1.0):
        methods: dict[str, Any] = {
            "plain": ours(target, None),
            "HF generate": hf_method(target),
            "HF prompt lookup 3": hf_method(target, prompt_lookup_num_tokens=3),
            "HF prompt lookup 10": hf_method(target, prompt_lookup_num_tokens=10),
            "HF assisted (small LM)": hf_method(target, assistant_model=assistant),
        }
        for seed in args.seeds:
            methods[f"dspark r=0 seed {seed}"] = ours(target, drafts[(0, seed)])
            methods[f"dspark r={TRAINING['markov_rank']} seed {seed}"] = ours(
                target, drafts[(TRAINING["markov_rank"], seed)]
            )
        with torch.inference_mode():
            report = measure(methods, prompts, temperature, args.max_new_tokens)
        results[f"T={temperature:g}"] = report
        print_table(
            f"T={temperature:g}, {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens",
            report,
            len(prompts),
        )
        print_markov_gains(report, args.seeds)
    (args.root / "peers" / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
