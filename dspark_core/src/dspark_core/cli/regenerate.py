"""``dspark regenerate``: rewrite a chat dataset's assistant turns with the target's own responses.

In process (HF ``generate``, the default) or, with ``--server URL``, through a serving engine's
OpenAI-compatible chat endpoint (vLLM, SGLang, ...): then only the target's tokenizer is loaded here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "replace the assistant turns of chat JSONL rows with the target's own responses (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        required=True,
        help="the target model directory (model and tokenizer; with --server only its tokenizer is read)",
    )
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
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows generated together in process (default 8)"
    )
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
    engine = parser.add_argument_group("through a serving engine (--server)")
    engine.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="an OpenAI-compatible chat endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, ...), "
        "instead of generating in this process",
    )
    engine.add_argument("--model", default=None, help="the served model's name (default: the first listed)")
    engine.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    engine.add_argument(
        "--retries", type=int, default=4, help="retries of a failed request, with backoff (default 4)"
    )
    engine.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request (default 600)"
    )
    engine.add_argument("--api-key", default=None, help="sent as a Bearer token, if the server wants one")


def _sampling(args: argparse.Namespace) -> Any:
    from dspark_core.datagen.regenerate import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _template_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("--chat-template-kwargs must be a JSON object")
    return template_kwargs


def _report(stats: Any, output: str) -> None:
    print(
        f"wrote {stats.rows_written} rows to {output} ({stats.turns_generated} responses, "
        f"{stats.tokens_generated} tokens); {stats.rows_already_done} already done, "
        f"{stats.rows_skipped_no_prompt} skipped without a user turn"
    )


def run_server(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from dspark_core.datagen.server import ChatServer, eos_token_ids, regenerate_via_server
    from dspark_core.model_dirs import require_model_dir

    target_dir = require_model_dir(args.target, "--target")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    server = ChatServer(
        args.server,
        model=args.model,
        api_key=args.api_key,
        timeout=args.request_timeout,
        retries=args.retries,
    )
    stats = regenerate_via_server(
        server,
        tokenizer,
        args.input,
        args.output,
        eos_ids=eos_token_ids(target_dir, tokenizer),
        sampling=_sampling(args),
        concurrency=args.concurrency,
        chat_template_kwargs=_template_kwargs(args),
        limit=args.limit,
        progress=args.progress,
    )
    _report(stats, args.output)
    print(f"{stats.requests} requests to {server.base} ({stats.retries} retried)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.server is not None:
        return run_server(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_core.datagen.regenerate import regenerate
    from dspark_core.model_dirs import require_model_dir

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    template_kwargs = _template_kwargs(args)
    target_dir = require_model_dir(args.target, "--target")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    ).to(device)
    sampling = _sampling(args)
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
    _report(stats, args.output)
    return 0
