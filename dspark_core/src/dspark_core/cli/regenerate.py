"""``dspark regenerate``: rewrite a chat dataset's assistant turns with the target's own responses."""

from __future__ import annotations

import argparse
import json

HELP = "replace the assistant turns of chat JSONL rows with the target's own responses (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the target model directory (model and tokenizer)")
    parser.add_argument(
        "--input",
        "-i",
        required=True,
        nargs="+",
        metavar="JSONL",
        help="chat rows (messages or conversations)",
    )
    parser.add_argument(
        "--output", "-o", required=True, metavar="JSONL", help="where to write; an existing file is resumed"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows generated together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per response (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (per batch)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many input rows")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the target runs"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="target dtype (auto: bf16 on CUDA)"
    )
    parser.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="extra chat-template variables, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.datagen.regenerate import SamplingConfig, regenerate
    from dspark_core.model_dirs import require_model_dir

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("--chat-template-kwargs must be a JSON object")
    target_dir = require_model_dir(args.target, "--target")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    ).to(device)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    stats = regenerate(
        target,
        tokenizer,
        args.input,
        args.output,
        sampling=sampling,
        batch_size=args.batch_size,
        chat_template_kwargs=template_kwargs,
        limit=args.limit,
        progress=args.progress,
    )
    print(
        f"wrote {stats.rows_written} rows to {args.output} ({stats.turns_generated} responses, "
        f"{stats.tokens_generated} tokens); {stats.rows_already_done} already done, "
        f"{stats.rows_skipped_no_prompt} skipped without a user turn"
    )
    return 0
