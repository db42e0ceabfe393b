"""What a reduced draft vocabulary buys: proposal time and tau at K = V, V/2, V/8 on the embedded target,
and the modelled draft ``lm_head`` FLOPs on a 152k vocabulary.

    flock /work/heavy.lock python benchmarks/vocab_bench.py [--root runs/vocab-bench] [--max-steps 300]
        [--num-train 1200] [--prompts 20] [--max-new-tokens 64] [--threads 1] [--divisors 1,2,8]

The quickstart's pieces: the shipped pretrained Qwen3 target (V = 4096), code data
answered by it, then one draft per K trained with the quickstart's settings (``--max-steps`` each,
``draft_vocab_size`` the only difference). Every held-out prompt is decoded greedily by each draft in
a rotating order (interleaved), timing each ``propose`` call. Per prompt: the mean proposal time and
tau (tokens committed per verify round, bonus token counted); the table gives the median over prompts
with min-max. Each draft's output is also checked against plain decoding (greedy must be identical).
A draft already trained under ``--root`` is reused (delete its ``run-k*`` folder to retrain after
changing ``--max-steps`` or the data). The FLOPs model is arithmetic, not timed. Prints tables,
asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dspark_core.datagen.code_demo import CodeDemoRecipe, build_code_demo_data
from dspark_core.quickstart import QuickstartPaths, heldout_prompts, training_config
from dspark_core.targets.shipped import install_shipped_target


def train_drafts(paths: QuickstartPaths, sizes: list[int | None], steps: int) -> dict[int | None, Path]:
    from dspark_core.training.trainer import train

    out: dict[int | None, Path] = {}
    for size in sizes:
        run = paths.root / f"run-k{size or 'full'}"
        if (run / "draft" / "model.safetensors").exists():
            print(f"reusing {run}")
        else:
            config = training_config(paths, {"max_steps": steps, "draft_vocab_size": size, "progress": False})
            started = time.perf_counter()
            train(replace(config, output_dir=str(run), overwrite=True))
            print(f"trained K={size or 'V'} in {time.perf_counter() - started:.0f} s")
        out[size] = run / "draft"
    return out


class ProposalTimer:
    """Wraps ``draft.propose`` and records the wall time of each call."""

    def __init__(self, draft: Any) -> None:
        self.times: list[float] = []
        inner = draft.propose

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = inner(*args, **kwargs)
            self.times.append(time.perf_counter() - started)
            return result

        draft.propose = timed


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return (
        f"{statistics.median(values) * scale:.{digits}f} "
        f"({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"
    )


def measure(
    paths: QuickstartPaths, drafts: dict[int | None, Path], prompts: int, max_new_tokens: int
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.decoding import plain_generate, speculative_generate
    from dspark_core.loading import load_draft

    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    vocab = int(target.config.vocab_size)
    loaded = {size: load_draft(path, target).eval() for size, path in drafts.items()}
    timers = {size: ProposalTimer(draft) for size, draft in loaded.items()}
    eos = target.generation_config.eos_token_id
    order = list(loaded)
    per_prompt: dict[int | None, dict[str, list[float]]] = {
        s: {"ms": [], "tau": [], "tok": []} for s in order
    }
    identical = dict.fromkeys(order, 0)
    rounds = dict.fromkeys(order, 0)
    committed = dict.fromkeys(order, 0)
    items = heldout_prompts(paths, tokenizer)[:prompts]
    with torch.inference_mode():
        for index, ids in enumerate(items):
            plain = plain_generate(target, ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
            rotated = order[index % len(order) :] + order[: index % len(order)]  # interleaved
            for size in rotated:
                timer = timers[size]
                start = len(timer.times)
                result = speculative_generate(
                    target,
                    loaded[size],
                    ids,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    check_fit=False,
                )
                calls = timer.times[start:]
                metrics = result.metrics
                per_prompt[size]["ms"].append(statistics.fmean(calls))
                per_prompt[size]["tau"].append(metrics.new_tokens / len(metrics.committed_per_round))
                per_prompt[size]["tok"].append(metrics.total_time_s / metrics.new_tokens)
                rounds[size] += len(metrics.committed_per_round)
                committed[size] += metrics.new_tokens
                identical[size] += int(result.sequences.tolist() == plain.sequences.tolist())
    full_ms = statistics.median(per_prompt[None]["ms"]) if None in per_prompt else None
    print(f"\nheld-out prompts: {len(items)}, greedy, {max_new_tokens} new tokens, torch threads "
          f"{torch.get_num_threads()}; median over prompts (min-max)")  # fmt: skip
    print(f"{'K':>6} | {'proposal ms/call':>20} | {'vs K=V':>7} | {'tau per prompt':>18} | "
          f"{'tau pooled':>10} | {'decode ms/token':>19} | greedy = plain")  # fmt: skip
    for size in order:
        ms = per_prompt[size]["ms"]
        ratio = f"{statistics.median(ms) / full_ms:.2f}x" if full_ms else "-"
        label = f"{size or vocab}"
        print(
            f"{label:>6} | {spread(ms, 1e3, 3):>20} | {ratio:>7} | {spread(per_prompt[size]['tau']):>18} | "
            f"{committed[size] / rounds[size]:>10.2f} | {spread(per_prompt[size]['tok'], 1e3):>19} | "
            f"{identical[size]}/{len(items)}"
        )


def flops_model() -> None:
    """Per proposed token, multiply-adds x 2, for a Qwen3-8B-shaped draft (attention scores left out:
    they grow with the context and do not depend on K)."""
    vocab, hidden, inter, heads, kv, head_dim, rank, layers, features = (
        151936, 4096, 12288, 32, 8, 128, 256, 5, 5,
    )  # fmt: skip
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    layer = 2 * (attention + 3 * hidden * inter)
    fc = 2 * features * hidden * hidden  # per context row, shared with the block; counted once
    print(f"\nmodelled FLOPs per drafted token, Qwen3-8B-shaped draft (H {hidden}, {layers} layers, "
          f"r {rank}, V {vocab}); lm_head = 2*H*K, Markov w2 = 2*r*K")  # fmt: skip
    print(f"{'K':>7} | {'lm_head GFLOP':>13} | {'vs K=V':>6} | {'+ w2 GFLOP':>10} | {'share of draft':>14}")
    for size in (vocab, vocab // 2, vocab // 8):
        head = 2 * hidden * size
        w2 = 2 * rank * size
        total = layers * layer + fc + head + w2
        print(
            f"{size:>7} | {head / 1e9:>13.3f} | {size / vocab:>6.3f} | {(head + w2) / 1e9:>10.3f} | "
            f"{(head + w2) / total:>14.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/vocab-bench")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--divisors", default="1,2,8", help="K = V / d for each d (1: the full vocabulary), comma-separated"
    )
    parser.add_argument("--flops-only", action="store_true")
    args = parser.parse_args()
    flops_model()
    if args.flops_only:
        return
    torch.set_num_threads(args.threads)
    paths = QuickstartPaths(Path(args.root))
    install_shipped_target(paths.target)
    build_code_demo_data(paths.target, paths.data, CodeDemoRecipe(num_train=args.num_train), progress=False)
    vocab = 4096  # the shipped target's
    sizes = [None if int(d) == 1 else vocab // int(d) for d in args.divisors.split(",")]
    drafts = train_drafts(paths, sizes, args.max_steps)
    measure(paths, drafts, args.prompts, args.max_new_tokens)


if __name__ == "__main__":
    main()
