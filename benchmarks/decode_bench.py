"""Speculative decoding against plain decoding on a CPU-sized target/draft pair.

    python benchmarks/decode_bench.py [--max-new-tokens 64] [--prompts 4] [--threads 1]

No trained pair exists yet, so the drafts are *initialised to imitate the target*:

- the target is a random Qwen3 whose attention and MLP outputs are scaled by ``--context-mix``
  (0 makes it an exact bigram model: its logits depend only on the current token), with a scaled
  ``lm_head`` so that its distributions are peaked like a real LM's;
- ``imitation``: a 1-layer DSpark draft whose Markov head (rank = vocab) holds the target's
  single-token logits, i.e. the target's bigram approximation (exact when ``--context-mix 0``);
- ``random``: the same draft architecture, untrained (the floor: little acceptance).

The target has ``--target-layers`` layers and the draft 1, so that one target forward costs about
10x a draft proposal on CPU (the script prints the measured ratio). Prints a table, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dspark_core.decoding import (
    SpeculativeMetrics,
    combine_metrics,
    plain_generate,
    speculative_generate,
)
from dspark_qwen3.modeling import Qwen3DSparkModel


def build_target(args: argparse.Namespace, context_mix: float) -> Qwen3ForCausalLM:
    """A random target; ``context_mix`` scales every residual branch (0: an exact bigram model)."""
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.target_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    target = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(args.sharpness)
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(context_mix)
            layer.mlp.down_proj.weight.mul_(context_mix)
    return target


def build_draft(target: Qwen3ForCausalLM, args: argparse.Namespace, imitate: bool) -> Qwen3DSparkModel:
    vocab = args.vocab
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SGLang layer-id note does not matter here
        torch.manual_seed(1)
        draft = Qwen3DSparkModel.from_target(
            target,
            num_draft_layers=1,
            block_size=args.block_size,
            mask_token_id=vocab - 1,
            markov_rank=vocab,
            markov_head_type="vanilla",
            enable_confidence_head=True,
        ).eval()
    if imitate:
        markov = draft.markov_head
        assert markov is not None
        with torch.no_grad():
            single = target(torch.arange(vocab).unsqueeze(1)).logits[:, 0, :]
            draft.norm.weight.zero_()  # lm_head(h) = 0: the Markov head alone gives the logits
            markov.markov_w1.weight.copy_(torch.eye(vocab))
            markov.markov_w2.weight.copy_(single.T)
    return draft


def prompts(args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randint(0, args.vocab - 1, (1, args.prompt_length), generator=generator)
        for _ in range(args.prompts)
    ]


def cost_ratio(target: Qwen3ForCausalLM, draft: Qwen3DSparkModel, args: argparse.Namespace) -> float:
    """Median time of one single-token cached target step over one full-block draft proposal."""
    ids = prompts(args)[0]
    steps = plain_generate(target, ids, max_new_tokens=33, eos_token_id=[])
    target_step = steps.metrics.target_time_s / steps.metrics.target_forwards
    features = torch.randn(1, 1, len(draft.config.target_layer_ids) * args.hidden)
    times = []
    for _ in range(20):
        cache = draft.new_cache()
        draft.propose(torch.tensor([1]), features.expand(1, args.prompt_length, -1), cache)
        began = time.perf_counter()
        draft.propose(torch.tensor([1]), features, cache)
        times.append(time.perf_counter() - began)
    return target_step / statistics.median(times)


def run_case(
    target: Qwen3ForCausalLM, draft: Qwen3DSparkModel, args: argparse.Namespace, temperature: float
) -> tuple[SpeculativeMetrics, SpeculativeMetrics, bool]:
    spec, plain, same = [], [], True
    for index, ids in enumerate(prompts(args)):
        options = {"max_new_tokens": args.max_new_tokens, "temperature": temperature, "eos_token_id": []}
        s = speculative_generate(target, draft, ids, seed=index, **options)  # type: ignore[arg-type]
        p = plain_generate(target, ids, seed=index, **options)  # type: ignore[arg-type]
        spec.append(s.metrics)
        plain.append(p.metrics)
        same &= s.new_tokens == p.new_tokens
    return combine_metrics(spec), combine_metrics(plain), same


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--target-layers", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--sharpness", type=float, default=20.0, help="lm_head scale of the target")
    parser.add_argument("--context-mix", type=float, nargs="+", default=[0.0, 0.02])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    return parser.parse_args()


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def table_row(
    target_name: str, kind: str, temperature: float, spec: Any, plain: Any, same: bool
) -> tuple[str, ...]:
    rates = " ".join("-" if r is None else f"{r:.2f}" for r in spec.accept_rates())
    return (
        target_name,
        kind,
        f"{temperature:g}",
        f"{spec.tau:.2f}",
        rates,
        f"{spec.mean_proposal_length:.2f}",
        f"{spec.tokens_per_s:.1f}",
        f"{plain.tokens_per_s:.1f}",
        f"{spec.tokens_per_s / plain.tokens_per_s:.2f}x",
        ("yes" if same else "NO") if temperature == 0 else "n/a",
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"target: Qwen3 {args.target_layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
        "draft: 1 layer, "
        f"block {args.block_size}, vanilla Markov rank {args.vocab}; {args.prompts} prompts x "
        f"{args.max_new_tokens} new tokens, {args.threads} thread(s), fp32 CPU"
    )
    header = (
        "target",
        "draft",
        "T",
        "tau",
        "accept_rate@0..",
        "mean l",
        "spec tok/s",
        "plain tok/s",
        "speedup",
        "same tokens",
    )
    rows: list[tuple[str, ...]] = []
    ratio_note = ""
    for mix in args.context_mix:
        target = build_target(args, mix)
        target_name = "bigram" if mix == 0 else f"mix {mix:g}"
        for kind in ("imitation", "random"):
            draft = build_draft(target, args, imitate=kind == "imitation")
            if not ratio_note:
                # Warm both paths once so one-time setup is not billed to the first case.
                speculative_generate(target, draft, prompts(args)[0], max_new_tokens=8)
                ratio_note = f"target step / draft proposal cost: {cost_ratio(target, draft, args):.1f}x"
            for temperature in (0.0, 1.0):
                spec, plain, same = run_case(target, draft, args, temperature)
                rows.append(table_row(target_name, kind, temperature, spec, plain, same))
    print(ratio_note)
    print_table(header, rows)


if __name__ == "__main__":
    main()
