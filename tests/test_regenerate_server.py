"""``regenerate --server``: the engine client against a real local HTTP server backed by a real target.

The server here is a small OpenAI-compatible chat endpoint (``http.server``) whose answers are the tiny
target's own greedy ``generate`` outputs, so the rows it produces can be compared with the in-process
path's. It can fail requests on purpose (HTTP 503, a dropped connection) to exercise retries and the
per-row error report. The real engine (vLLM) is exercised by the ``engine`` nox session.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_core.cli import main as cli_main
from dspark_core.datagen.regenerate import SamplingConfig, generate_response_ids, regenerate
from dspark_core.datagen.server import (
    ChatServer,
    RegenerateFailedError,
    ServerError,
    eos_token_ids,
    regenerate_via_server,
)
from dspark_qwen3.testing import make_tiny_target

MAX_NEW = 6

ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "No user turn here."}]},
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "one two three"},
            {"role": "user", "content": "And back?"},
            {"role": "assistant", "content": "three two one"},
        ]
    },
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "user", "content": "Name a fruit."}]},
    {"messages": [{"role": "user", "content": "Name a river."}]},
]


@dataclass
class Behaviour:
    """What the fake engine does: which requests fail, and whether it returns token ids."""

    return_token_ids: bool = True
    fail_first: int = 0  # the first N chat requests get HTTP 503
    drop_first: int = 0  # then the next N lose their connection without an answer
    always_fail_content: str | None = None  # a user turn with this text always gets HTTP 500
    bad_request_content: str | None = None  # ... or HTTP 400 (not retried)
    hang_content: str | None = None  # a user turn with this text waits for `release`
    interrupt_after: int = 0  # ... and SIGINTs this process once the client has this many other replies
    release: threading.Event = field(default_factory=threading.Event)
    replies_received: int = 0  # counted by the client (CountingChatServer), after it parsed each reply
    chat_requests: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)


class FakeEngine:
    """An OpenAI-compatible ``/v1/chat/completions`` answering with the real target, on 127.0.0.1."""

    def __init__(self, target: Any, tokenizer: Any, behaviour: Behaviour) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.eos = eos_token_ids(target.name_or_path, tokenizer)
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send_json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
                else:
                    self.send_json(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                request = json.loads(self.rfile.read(length))
                status, payload = engine.answer(request)
                if status == 0:
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_json(status, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, request: dict[str, Any]) -> tuple[int, Any]:
        b = self.behaviour
        with self.lock:
            b.chat_requests += 1
            b.seen.append(request)
            number = b.chat_requests
        last_user = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
        if number <= b.fail_first:
            return 503, {"error": {"message": "engine overloaded"}}
        if number <= b.fail_first + b.drop_first:
            return 0, None
        if b.always_fail_content is not None and last_user == b.always_fail_content:
            return 500, {"error": {"message": "engine crashed on this prompt"}}
        if b.bad_request_content is not None and last_user == b.bad_request_content:
            return 400, {"error": {"message": "prompt too long"}}
        if b.hang_content is not None and last_user == b.hang_content:
            # Wait until the client itself holds the other replies (counted on the client's side, so
            # a loaded machine cannot make the signal overtake them), then let its threads return.
            while True:
                with self.lock:
                    if b.replies_received >= b.interrupt_after:
                        break
                time.sleep(0.01)
            time.sleep(0.5)
            # The user presses Ctrl-C; sent to the main thread itself, which is the one blocked waiting
            # (a process-wide signal may be taken by another thread and leave it blocked).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            b.release.wait(timeout=60)
            return 503, {"error": {"message": "gave up"}}
        sampling = SamplingConfig(max_new_tokens=request["max_tokens"], temperature=request["temperature"])
        with self.lock:
            (ids,), _ = generate_response_ids(self.target, self.tokenizer, [request["messages"]], sampling)
        stopped = len(ids) < sampling.max_new_tokens
        # vLLM's token ids end with the eos token when generation stopped there.
        returned = [*ids, self.eos[0]] if stopped else ids
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": self.tokenizer.decode(ids, skip_special_tokens=True)},
            "finish_reason": "stop" if stopped else "length",
        }
        if b.return_token_ids and request.get("return_token_ids"):
            choice["token_ids"] = returned
        return 200, {"choices": [choice], "usage": {"completion_tokens": len(returned)}}

    def __enter__(self) -> FakeEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("regen-server") / "target", num_layers=2)


@pytest.fixture(scope="module")
def target(target_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(target_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(target_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def engine(target: Any, tokenizer: Any, **behaviour: Any) -> FakeEngine:
    return FakeEngine(target, tokenizer, Behaviour(**behaviour))


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def in_process(target: Any, tokenizer: Any, input_file: Path, output: Path) -> list[dict[str, Any]]:
    regenerate(
        target,
        tokenizer,
        input_file,
        output,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        batch_size=1,
        progress=False,
    )
    return read_output(output)


class CountingChatServer(ChatServer):
    """The real client, counting in ``behaviour`` each reply it has received and parsed."""

    def __init__(self, url: str, behaviour: Behaviour | None, **options: Any) -> None:
        super().__init__(url, **options)
        self.behaviour = behaviour
        self.lock = threading.Lock()

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().chat(*args, **kwargs)
        if self.behaviour is not None:
            with self.lock:
                self.behaviour.replies_received += 1
        return reply


def via_server(
    url: str,
    target_dir: Path,
    tokenizer: Any,
    input_file: Path,
    output: Path,
    fake: FakeEngine | None = None,
    **options: Any,
) -> Any:
    server = CountingChatServer(
        url,
        None if fake is None else fake.behaviour,
        retries=options.pop("retries", 3),
        backoff=0.01,
    )
    return regenerate_via_server(
        server,
        tokenizer,
        input_file,
        output,
        eos_ids=eos_token_ids(target_dir, tokenizer),
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        progress=False,
        **options,
    )


def test_server_rows_equal_the_in_process_rows(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    expected = in_process(target, tokenizer, input_file, tmp_path / "local.jsonl")
    with engine(target, tokenizer) as fake:
        stats = via_server(
            fake.url, target_dir, tokenizer, input_file, tmp_path / "served.jsonl", concurrency=3
        )
    # Same rows, same order, same text and the same ids (the eos the engine returned cut off).
    assert read_output(tmp_path / "served.jsonl") == expected
    assert stats.rows_written == 6 and stats.rows_skipped_no_prompt == 1 and stats.turns_generated == 7
    assert stats.responses_retokenised == 0
    assert fake.behaviour.seen[0]["return_token_ids"] is True and fake.behaviour.seen[0]["model"] == "tiny"


def test_the_cli_resumes_a_server_run_where_it_stopped(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    expected = in_process(target, tokenizer, input_file, tmp_path / "local.jsonl")
    output = tmp_path / "served.jsonl"
    with engine(target, tokenizer) as fake:
        args = [
            "regenerate",
            "--target",
            str(target_dir),
            "--input",
            str(input_file),
            "--output",
            str(output),
        ]
        args += ["--server", fake.url, "--max-new-tokens", str(MAX_NEW), "--no-progress"]
        assert cli_main([*args, "--limit", "2"]) == 0
        first = fake.behaviour.chat_requests
        with output.open("a") as handle:
            handle.write('{"messages": [{"role": "user", "con')  # a torn line from a killed run
        assert cli_main([*args, "--concurrency", "4"]) == 0
    assert read_output(output) == expected
    # The resumed run asked only for the rows not yet written: 7 turns in all, none twice.
    assert first == 2 and fake.behaviour.chat_requests == 7


def test_transient_errors_are_retried_with_backoff(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    expected = in_process(target, tokenizer, input_file, tmp_path / "local.jsonl")
    with engine(target, tokenizer, fail_first=2, drop_first=1) as fake:
        stats = via_server(fake.url, target_dir, tokenizer, input_file, tmp_path / "out.jsonl", concurrency=1)
    assert read_output(tmp_path / "out.jsonl") == expected
    assert stats.retries == 3 and stats.requests == 7 + 3 + 1  # 7 turns, 3 retried, 1 model listing


def test_a_row_that_keeps_failing_is_reported_and_the_others_are_kept(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    expected = in_process(target, tokenizer, input_file, tmp_path / "local.jsonl")
    output = tmp_path / "out.jsonl"
    failing = engine(target, tokenizer, always_fail_content="Why is the sky blue?")
    with failing as fake, pytest.raises(RegenerateFailedError) as caught:
        via_server(fake.url, target_dir, tokenizer, input_file, output, concurrency=2, retries=2)
    message = str(caught.value)
    assert f"{input_file}:5: HTTP 500" in message and "(after 3 tries)" in message
    assert "1 rows failed; 5 rows were written" in message
    # Every other row is on disk, including the ones after the failed row.
    assert [r["row"] for r in read_output(output)] == [0, 1, 3, 5, 6]
    # The same command again retries just the missing row.
    with engine(target, tokenizer) as fake:
        stats = via_server(fake.url, target_dir, tokenizer, input_file, output)
    assert stats.rows_written == 1 and fake.behaviour.chat_requests == 1
    assert sorted(read_output(output), key=lambda r: r["row"]) == expected


def test_a_bad_request_is_not_retried_and_the_cli_reports_it_per_row(
    target: Any,
    tokenizer: Any,
    target_dir: Path,
    input_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out.jsonl"
    with engine(target, tokenizer, bad_request_content="Name a fruit.") as fake:
        code = cli_main(
            [
                *(
                    "regenerate",
                    "--target",
                    str(target_dir),
                    "--input",
                    str(input_file),
                    "--output",
                    str(output),
                ),
                *(
                    "--server",
                    fake.url,
                    "--max-new-tokens",
                    str(MAX_NEW),
                    "--no-progress",
                    "--concurrency",
                    "1",
                ),
            ]
        )
        requests = fake.behaviour.chat_requests
    err = capsys.readouterr().err
    assert code == 1
    assert f"{input_file}:6: HTTP 400" in err and "prompt too long" in err and "Traceback" not in err
    assert requests == 7  # asked once: a 400 is the request's fault, asking again cannot help


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in an interactive shell. A shell without job control starts
    background commands with SIGINT ignored, and Python keeps it so (CI launched that way did)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_keeps_the_rows_that_finished_behind_an_unfinished_one(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    expected = {r["row"]: r for r in in_process(target, tokenizer, input_file, tmp_path / "local.jsonl")}
    output = tmp_path / "out.jsonl"
    # Row 1 hangs; rows 0, 3 (two turns), 4, 5 and 6 are answered; then Ctrl-C arrives.
    hanging = engine(target, tokenizer, hang_content="Hello", interrupt_after=6)
    try:
        with hanging as fake, pytest.raises(KeyboardInterrupt):
            via_server(fake.url, target_dir, tokenizer, input_file, output, fake, concurrency=6)
    finally:
        fake.behaviour.release.set()
    written = read_output(output)
    # Row 0 was written in order; 3 to 6 finished behind the hanging row and were kept too.
    assert sorted(r["row"] for r in written) == [0, 3, 4, 5, 6]
    assert all(r == expected[r["row"]] for r in written)
    # The next run answers only what is missing, and the file then holds every row once.
    with engine(target, tokenizer) as fake:
        via_server(fake.url, target_dir, tokenizer, input_file, output)
    assert fake.behaviour.chat_requests == 1
    assert sorted(read_output(output), key=lambda r: r["row"]) == list(expected.values())


def test_an_unreachable_server_stops_after_a_few_rows(
    tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    # A port nobody listens on: every request is refused.
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]
    server = ChatServer(f"http://127.0.0.1:{port}", model="tiny", retries=1, backoff=0.01)
    with pytest.raises(RegenerateFailedError, match="rows failed; the rows after them were not sent"):
        regenerate_via_server(
            server,
            tokenizer,
            input_file,
            tmp_path / "out.jsonl",
            eos_ids=[],
            concurrency=1,
            max_consecutive_failures=2,
            progress=False,
        )
    # Two rows failed (two tries each) and stopped the run; the row already queued behind them (the
    # window holds 2 x concurrency rows) failed too; the other three rows were never sent.
    assert server.requests == 3 * 2
    assert not (tmp_path / "out.jsonl").read_text()


def test_replies_without_token_ids_are_retokenised_with_one_warning(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    warnings: list[str] = []
    with engine(target, tokenizer, return_token_ids=False) as fake:
        stats = via_server(
            fake.url, target_dir, tokenizer, input_file, tmp_path / "out.jsonl", warn=warnings.append
        )
    assert stats.responses_retokenised == 7
    assert len(warnings) == 1 and "re-tokenising" in warnings[0]
    for record in read_output(tmp_path / "out.jsonl"):
        for turn in record["messages"]:
            if turn["role"] == "assistant":
                assert turn["response_ids"] == tokenizer.encode(turn["content"], add_special_tokens=False)


def test_sampling_options_and_per_row_seeds_reach_the_server(
    target: Any, tokenizer: Any, target_dir: Path, input_file: Path, tmp_path: Path
) -> None:
    def asked(seed: int) -> list[dict[str, Any]]:
        with engine(target, tokenizer) as fake:
            server = ChatServer(fake.url, model="tiny")
            sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.9, top_k=20, seed=seed)
            regenerate_via_server(
                server,
                tokenizer,
                input_file,
                tmp_path / f"{seed}-{len(list(tmp_path.iterdir()))}.jsonl",
                eos_ids=[],
                sampling=sampling,
                concurrency=2,
                progress=False,
            )
        return sorted(fake.behaviour.seen, key=lambda r: json.dumps(r["messages"]))

    first, again, other = asked(1), asked(1), asked(2)
    assert {(r["temperature"], r["top_p"], r["top_k"], r["max_tokens"]) for r in first} == {
        (0.7, 0.9, 20, MAX_NEW)
    }
    assert len({r["seed"] for r in first}) == 7  # a seed per row and turn
    assert [r["seed"] for r in first] == [r["seed"] for r in again]
    assert [r["seed"] for r in first] != [r["seed"] for r in other]


def test_server_urls_are_normalised_and_bad_ones_refused() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert ChatServer(url).base == "http://h:1/v1"
    with pytest.raises(ValueError, match="must be an http"):
        ChatServer("127.0.0.1:8000")
    with pytest.raises(ServerError):
        ChatServer("http://127.0.0.1:9/v1", retries=0).model  # noqa: B018
