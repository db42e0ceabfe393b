"""Draft model costs on CPU: one training step, the L1 term's memory, and block proposal latency.

Config (the model issue's): a Qwen3-shaped target with hidden 256 and 8 layers, a 2-layer draft,
V 4096, S 512, N 32 anchors, B 7. Random weights: this measures cost, not quality.

    python benchmarks/model_bench.py [--steps 5] [--threads 2]

Peak memory is the peak resident set size of a fresh process running only that measurement,
minus the same process's RSS just before it (CPU tensors are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

HIDDEN, TARGET_LAYERS, DRAFT_LAYERS, VOCAB, SEQ, ANCHORS, BLOCK = 256, 8, 2, 4096, 512, 32, 7


def build(markov_rank: int = 64) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dspark_core.modeling.features import capture_target_features
    from dspark_qwen3.modeling import Qwen3DSparkModel

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=TARGET_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=0,
    )
    target = Qwen3ForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draft = Qwen3DSparkModel.from_target(
            target,
            num_draft_layers=DRAFT_LAYERS,
            block_size=BLOCK,
            mask_token_id=VOCAB - 1,
            num_anchors=ANCHORS,
            markov_rank=markov_rank,
            confidence_head_with_markov=markov_rank > 0,
        )
    input_ids = torch.randint(2, VOCAB - 1, (1, SEQ))
    features = capture_target_features(target, input_ids, draft.config.target_layer_ids)
    batch = {
        "input_ids": input_ids,
        "target_features": features.features,
        "target_final_hidden": features.final_hidden,
        "loss_mask": torch.ones_like(input_ids),
    }
    return target, draft, batch


def train_step(steps: int) -> dict[str, float]:
    import torch

    from dspark_core.modeling.loss import DSparkObjective

    _, draft, batch = build()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    objective = DSparkObjective()
    times = []
    before = _rss_mib()
    for step in range(steps + 1):
        start = time.perf_counter()
        out = objective(draft, draft(**batch, generator=generator))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms allocator and kernels
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "step_s": seconds,
        "tokens_per_s": SEQ / seconds,
        "block_tokens_per_s": ANCHORS * BLOCK / seconds,
        "peak_delta_mib": _peak_mib() - before,
    }


def l1_memory(chunk_size: int | None) -> dict[str, float]:
    import torch

    from dspark_core.modeling.loss import DSparkLossConfig, dspark_objective

    torch.manual_seed(0)
    blocks = 8 * ANCHORS  # 8 rows of N anchors: 1792 supervised slots
    hidden = torch.randn(blocks, BLOCK, HIDDEN, requires_grad=True)
    teacher = torch.randn(blocks, BLOCK, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN) * 0.02
    labels = torch.randint(0, VOCAB, (blocks, BLOCK))
    mask = torch.ones(blocks, BLOCK, dtype=torch.bool)
    before = _rss_mib()
    out = dspark_objective(
        draft_hidden=hidden,
        markov_latent=None,
        teacher_hidden=teacher,
        lm_head_weight=weight,
        markov_w2_weight=None,
        labels=labels,
        eval_mask=mask,
        confidence_logits=None,
        config=DSparkLossConfig(chunk_size=chunk_size),
    )
    out.loss.backward()
    return {"tokens": blocks * BLOCK, "peak_delta_mib": _peak_mib() - before}


def proposal_latency(markov_rank: int, repeats: int) -> dict[str, float]:
    import torch

    _, draft, batch = build(markov_rank=markov_rank)
    draft.eval()
    times = []
    for _ in range(repeats + 1):
        cache = draft.new_cache()
        with torch.no_grad():
            cache_features = batch["target_features"][:, :256]
            draft.propose(batch["input_ids"][:, 256], cache_features, cache)  # prefill the context
            cache.crop(255)
            start = time.perf_counter()
            draft.propose(batch["input_ids"][:, 256], batch["target_features"][:, 255:256], cache)
            times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times[1:]) * 1000}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_fresh_process(name: str, *args: Any) -> dict[str, float]:
    code = (
        f"import json, sys; sys.path.insert(0, {sys.path[0]!r}); import model_bench as b; "
        f"print(json.dumps(b.{name}(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={HIDDEN} "
        f"target layers={TARGET_LAYERS} draft layers={DRAFT_LAYERS} V={VOCAB} S={SEQ} N={ANCHORS} B={BLOCK}"
    )
    step = _in_fresh_process("train_step", args.steps)
    print(
        f"training step (fwd+bwd+AdamW, r=64, conf head): {step['step_s'] * 1000:.0f} ms, "
        f"{step['tokens_per_s']:.0f} sequence tokens/s, {step['block_tokens_per_s']:.0f} block tokens/s, "
        f"peak +{step['peak_delta_mib']:.0f} MiB"
    )
    for chunk in (None, 1024, 256):
        mem = _in_fresh_process("l1_memory", chunk)
        label = "unchunked" if chunk is None else f"chunk {chunk}"
        print(
            f"objective fwd+bwd over {int(mem['tokens'])} slots x V={VOCAB}, {label:>10}: "
            f"peak +{mem['peak_delta_mib']:.0f} MiB"
        )
    for rank, label in ((64, "with Markov head (serial, r=64)"), (0, "without Markov head (r=0)")):
        latency = proposal_latency(rank, args.repeats)
        print(f"block proposal, cached context, {label}: {latency['ms']:.2f} ms")


if __name__ == "__main__":
    main()
