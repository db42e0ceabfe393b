"""Regeneration throughput: in-process ``regenerate`` against ``regenerate --server`` with vLLM (CPU).

    flock /work/heavy.lock python benchmarks/regen_bench.py --engine-python ENGINE_VENV/bin/python \\
        [--prompts 1200] [--rounds 2] [--cores 0,1]

On the embedded target (the shipped one, fp32) with the quickstart's training prompts
(:mod:`dspark_core.datagen.code_demo`, ``--prompts`` of them spread over the 1,200; greedy, 64 new
tokens as the quickstart asks). The vLLM server (its own venv, ``--engine-python``) is started once,
pinned to ``--cores`` with ``OMP_NUM_THREADS`` set to their number; this process is pinned to the
same cores. Then rounds alternate: in-process (HF ``generate``, batches of ``--batch-size`` as the
quickstart), then through the server (``--concurrency`` requests in flight), each writing a fresh
file. Reports rows/s per round, the median with min-max, the ratio, and the CPU seconds the server's
processes and this process spent in each kind of round: what limits each. Prints Markdown; asserts
nothing but that both paths wrote every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.datagen.code_demo import CodeDemoRecipe, prompt_fits, select_tasks, spread
from dspark_core.datagen.regenerate import SamplingConfig, regenerate
from dspark_core.datagen.server import ChatServer, eos_token_ids, regenerate_via_server
from dspark_core.targets.corpus import Corpus
from dspark_core.targets.shipped import install_shipped_target

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of ``root`` and every live descendant (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total = 0.0
    for pid, seconds in times.items():
        walk = pid
        while walk in parents and walk != root and walk > 1:
            walk = parents[walk]
        if walk == root:
            total += seconds
    return total


def own_cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    engine_python: str, target: Path, cores: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    threads = str(len(cores.split(",")))
    command = [
        "taskset",
        "-c",
        cores,
        engine_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(target), "--served-model-name", "tiny", "--dtype", "float32"),
        *("--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "VLLM_CPU_KVCACHE_SPACE": "2"}
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5):
                return process, url
        except OSError:
            time.sleep(2)
    stop_server(process)
    raise SystemExit(f"the server did not start within 900 s; see {log}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-python", required=True, help="the python of a venv with vllm-cpu")
    parser.add_argument(
        "--prompts", type=int, default=1200, help="prompts, spread over the quickstart's 1,200"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each path")
    parser.add_argument("--cores", default="0,1", help="CPU cores for both paths (taskset list)")
    parser.add_argument("--batch-size", type=int, default=32, help="in-process batch (the quickstart's)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight through the server")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    torch.set_num_threads(len(args.cores.split(",")))
    work = Path(args.work or tempfile.mkdtemp(prefix="regen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    target = work / "target"
    if not (target / "config.json").exists():
        install_shipped_target(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    recipe = CodeDemoRecipe()
    train, _ = select_tasks(
        Corpus.stdlib(),
        recipe,
        fits=lambda task: prompt_fits(task, tokenizer, recipe.max_prompt_tokens),
    )
    chosen = spread(train, args.prompts)
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": t.messages(with_answer=False)}) + "\n" for t in chosen)
    )
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    process, url = start_server(args.engine_python, target, args.cores, work / "server.log")
    results: dict[str, list[dict[str, Any]]] = {"in-process": [], "server": []}
    try:
        server = ChatServer(url, model="tiny")
        eos = eos_token_ids(target, tokenizer)
        for round_index in range(args.rounds):
            for path in ("in-process", "server"):
                output = work / f"{path}-{round_index}.jsonl"
                output.unlink(missing_ok=True)
                server_cpu, own_cpu = tree_cpu_seconds(process.pid), own_cpu_seconds()
                started = time.perf_counter()
                if path == "in-process":
                    stats: Any = regenerate(
                        model,
                        tokenizer,
                        prompts,
                        output,
                        sampling=sampling,
                        batch_size=args.batch_size,
                        progress=False,
                    )
                else:
                    stats = regenerate_via_server(
                        server,
                        tokenizer,
                        prompts,
                        output,
                        eos_ids=eos,
                        sampling=sampling,
                        concurrency=args.concurrency,
                        progress=False,
                    )
                seconds = time.perf_counter() - started
                assert stats.rows_written == len(chosen), (path, stats.rows_written)
                results[path].append(
                    {
                        "seconds": seconds,
                        "rows_per_s": stats.rows_written / seconds,
                        "tokens_per_s": stats.tokens_generated / seconds,
                        "server_cpu_s": tree_cpu_seconds(process.pid) - server_cpu,
                        "client_cpu_s": own_cpu_seconds() - own_cpu,
                    }
                )
                print(f"round {round_index} {path}: {results[path][-1]}", flush=True)
        same = sum(
            a == b
            for a, b in zip(
                (work / "in-process-0.jsonl").read_text().splitlines(),
                (work / "server-0.jsonl").read_text().splitlines(),
                strict=True,
            )
        )
    finally:
        stop_server(process)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    local, served = results["in-process"], results["server"]
    ratios = [s["rows_per_s"] / i["rows_per_s"] for i, s in zip(local, served, strict=True)]
    print(
        f"\n{len(chosen)} quickstart prompts, greedy, {args.max_new_tokens} new tokens, cores {args.cores}, "
        f"{args.rounds} alternating rounds; rows identical in both paths (round 0): {same}/{len(chosen)}\n"
    )
    print("| path | rows/s | tokens/s | server CPU s per round | this process's CPU s per round |")
    print("|---|---|---|---|---|")
    for name, rows, how in (
        ("in-process (HF generate)", local, f"batch {args.batch_size}"),
        ("--server (vLLM CPU)", served, f"concurrency {args.concurrency}"),
    ):
        print(
            f"| {name}, {how} | {median_range([r['rows_per_s'] for r in rows])} | "
            f"{median_range([r['tokens_per_s'] for r in rows])} | "
            f"{median_range([r['server_cpu_s'] for r in rows])} | "
            f"{median_range([r['client_cpu_s'] for r in rows])} |"
        )
    print(f"\n--server / in-process rows/s: {median_range(ratios)}x (per round)")


if __name__ == "__main__":
    main()
