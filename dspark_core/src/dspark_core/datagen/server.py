"""Regenerate through a serving engine: an OpenAI-compatible chat endpoint (vLLM, SGLang, ...).

:func:`regenerate_via_server` answers the same rows as the in-process
:func:`~dspark_core.datagen.regenerate.regenerate` and writes the same lines, through the same
reading, resuming and writing (:func:`~dspark_core.datagen.regenerate.regeneration_run`). Rows are
independent requests, so a bounded thread pool keeps ``concurrency`` of them in flight and the
engine batches them; a row's assistant turns are asked for one after another, each conditioned on
the turns already regenerated. Lines are written in input order as rows finish.

Token ids: vLLM returns the generated ids when asked (``return_token_ids``); they are stored as
``response_ids`` (cut before the end-of-sequence token), as the in-process path does. A server that
returns none gets its text re-tokenised with the target's tokenizer, with a one-line warning, since
decoding and re-tokenising does not always give the target's own ids back.

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff; a row
that still fails is reported with its ``file:line`` and left out, so the next run (same command)
retries exactly the missing rows. Finished rows are never lost. After ``max_consecutive_failures``
failed rows in a row the run stops submitting: the server is most likely down. Only the standard
library speaks HTTP here (urllib and a thread pool), so the client adds no dependency.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark_core.datagen.regenerate import (
    RegenerateStats,
    SamplingConfig,
    check_chat_template,
    conversation_plan,
    regeneration_run,
)
from dspark_core.errors import DSparkError
from dspark_core.training.data import ChatRow
from dspark_core.training.distributed import rank_seed

__all__ = [
    "ChatReply",
    "ChatServer",
    "RegenerateFailedError",
    "ServerError",
    "ServerRegenerateStats",
    "regenerate_via_server",
]

#: HTTP statuses worth asking again: rate limiting and the server's own failures.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class ServerError(DSparkError, RuntimeError):
    """A request to the serving engine failed (after its retries, when the failure was transient)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class RegenerateFailedError(DSparkError, RuntimeError):
    """Some rows could not be answered; the others are written. One failed row per line."""

    multiline = True


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the text, the generated ids when the server returned them, and why it stopped."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None
    completion_tokens: int | None


def _endpoint_base(url: str) -> str:
    """``http://host:port/v1`` from any of ``http://host:port``, ``.../v1``, ``.../v1/chat/completions``."""
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if not base.endswith("/v1"):
        base += "/v1"
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--server must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")
    return base


class ChatServer:
    """A client of one OpenAI-compatible chat endpoint, safe to share between threads.

    ``retries`` further tries follow a transient failure, after ``backoff``, ``2 * backoff``, ...
    seconds (capped at 30 s).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 1.0,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base = _endpoint_base(url)
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self._lock = threading.Lock()
        self.requests = 0
        self.retried = 0
        self._model = model

    # -- HTTP ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One HTTP exchange, JSON in and out; raises :class:`ServerError` saying whether to retry."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = " ".join(exc.read().decode("utf-8", "replace").split())[:300]
            raise ServerError(
                f"HTTP {exc.code} from {self.base + path}: {detail or exc.reason}",
                retryable=exc.code in _RETRYABLE_STATUS,
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach {self.base + path}: {reason}", retryable=True) from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise ServerError(
                f"{self.base + path} answered with something other than JSON: {payload[:120]!r}",
                retryable=True,
            ) from None

    def _with_retries(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                with self._lock:
                    self.requests += 1
                return self._request(method, path, body)
            except ServerError as exc:
                if not exc.retryable or attempt == self.retries:
                    if attempt:
                        raise ServerError(f"{exc} (after {attempt + 1} tries)", retryable=False) from None
                    raise
            with self._lock:
                self.retried += 1
            self.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the API -------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model's name: as given, or the first the server lists at ``/v1/models``."""
        if self._model is None:
            listing = self._with_retries("GET", "/models")
            names = [m.get("id") for m in listing.get("data", []) if isinstance(m, Mapping)]
            if not names or not isinstance(names[0], str):
                raise ServerError(f"{self.base}/models lists no model; pass --model NAME", retryable=False)
            self._model = names[0]
        return self._model

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatReply:
        """The assistant's next turn after ``messages``, sampled as ``sampling`` says."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            # vLLM: return the generated ids (other servers ignore unknown fields or say so).
            "return_token_ids": True,
        }
        if sampling.temperature > 0:
            if sampling.top_p is not None:
                body["top_p"] = sampling.top_p
            if sampling.top_k is not None:
                body["top_k"] = sampling.top_k
            if seed is not None:
                body["seed"] = seed
        if chat_template_kwargs:
            body["chat_template_kwargs"] = dict(chat_template_kwargs)
        response = self._with_retries("POST", "/chat/completions", body)
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"{self.base}/chat/completions answered without choices[0].message.content: "
                f"{json.dumps(response)[:200]}",
                retryable=False,
            ) from None
        ids = choice.get("token_ids")
        usage = response.get("usage") or {}
        return ChatReply(
            text=str(text),
            token_ids=[int(t) for t in ids] if isinstance(ids, list) else None,
            finish_reason=choice.get("finish_reason"),
            completion_tokens=usage.get("completion_tokens"),
        )


@dataclass
class ServerRegenerateStats(RegenerateStats):
    """:class:`RegenerateStats` plus what only a server run has."""

    requests: int = 0
    retries: int = 0
    rows_failed: int = 0
    responses_retokenised: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _RowAnswer:
    messages: list[dict[str, Any]]
    turns: int
    tokens: int
    retokenised: int


class _RowAnswerer:
    """Answers one row through the server (called from the pool's threads)."""

    def __init__(
        self,
        server: ChatServer,
        sampling: SamplingConfig,
        tokenizer: Any,
        eos_ids: Iterable[int],
        chat_template_kwargs: Mapping[str, Any] | None,
    ) -> None:
        self.server = server
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.chat_template_kwargs = chat_template_kwargs
        self._tokenizer_lock = threading.Lock()

    def __call__(self, index: int, row: ChatRow) -> _RowAnswer:
        plan = conversation_plan(row)
        turns = tokens = retokenised = 0
        for position, turn in enumerate(plan):
            if turn["role"] != "assistant":
                continue
            context = [{"role": m["role"], "content": m["content"]} for m in plan[:position]]
            # A seed per row and turn: a resumed run asks exactly what an uninterrupted one asked.
            seed = rank_seed(self.sampling.seed, index, f"regenerate-turn-{turns}")
            reply = self.server.chat(
                context, self.sampling, seed=seed, chat_template_kwargs=self.chat_template_kwargs
            )
            ids = self._response_ids(reply)
            if reply.token_ids is None:
                retokenised += 1
            turn["content"] = reply.text
            turn["response_ids"] = ids
            turns += 1
            tokens += reply.completion_tokens if reply.completion_tokens is not None else len(ids)
        return _RowAnswer(plan, turns, tokens, retokenised)

    def _response_ids(self, reply: ChatReply) -> list[int]:
        if reply.token_ids is None:
            with self._tokenizer_lock:  # one tokenizer shared by the pool's threads
                return [int(t) for t in self.tokenizer.encode(reply.text, add_special_tokens=False)]
        ids = list(reply.token_ids)
        # The engine's ids end with the end-of-sequence token when it stopped there; the in-process
        # path cuts before it, and the trainer's template adds its own end of turn.
        cut = next((i for i, token in enumerate(ids) if token in self.eos_ids), len(ids))
        return ids[:cut]


def eos_token_ids(target_dir: str | Path, tokenizer: Any) -> list[int]:
    """The target's end-of-sequence ids: its generation config's and its tokenizer's."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        generation = GenerationConfig.from_pretrained(target_dir)
        configured = generation.eos_token_id
    except OSError:
        configured = None
    for source in (configured, tokenizer.eos_token_id):
        if source is None:
            continue
        for token in [source] if isinstance(source, int) else list(source):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def regenerate_via_server(
    server: ChatServer,
    tokenizer: Any,
    inputs: str | Path | Sequence[str | Path] | Iterable[ChatRow],
    output_path: str | Path,
    *,
    eos_ids: Iterable[int],
    sampling: SamplingConfig | None = None,
    concurrency: int = 8,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
    max_consecutive_failures: int | None = None,
    warn: Callable[[str], object] | None = None,
) -> ServerRegenerateStats:
    """As :func:`~dspark_core.datagen.regenerate.regenerate`, with ``server`` answering the rows.

    ``tokenizer`` re-tokenises replies that come back without token ids; ``eos_ids`` are cut from
    the ids that do. Raises :class:`RegenerateFailedError` (after writing every row that succeeded)
    when rows failed; running again retries just those.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    check_chat_template(tokenizer)
    sampling = sampling or SamplingConfig()
    give_up_after = max_consecutive_failures or max(8, 2 * concurrency)
    server.model  # noqa: B018  (resolve the served model's name once, before the threads ask for it)
    answer_row = _RowAnswerer(server, sampling, tokenizer, eos_ids, chat_template_kwargs)
    stats = ServerRegenerateStats()
    warned = False
    started = time.perf_counter()
    with regeneration_run(inputs, output_path, limit=limit, progress=progress, stats=stats) as run:
        say = warn or run.note
        # Rows in flight, in input order; the head is written as soon as it is done.
        window: deque[tuple[int, ChatRow, Future[_RowAnswer]]] = deque()
        consecutive_failures = 0
        stopped = False
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dspark-regenerate")
        try:
            rows = iter(run.rows)
            while True:
                while not stopped and len(window) < 2 * concurrency:
                    item = next(rows, None)
                    if item is None:
                        break
                    window.append((*item, pool.submit(answer_row, *item)))
                if not window:
                    break
                wait([window[0][2]], return_when=FIRST_COMPLETED)
                written = 0
                while window and window[0][2].done():
                    index, row, future = window.popleft()
                    try:
                        answer = future.result()
                    except ServerError as exc:
                        where = str(row.origin) if row.origin else f"row {index}"
                        stats.failures.append(f"{where}: {exc}")
                        stats.rows_failed += 1
                        say(f"regenerate: {where}: {exc}")
                        consecutive_failures += 1
                        if consecutive_failures >= give_up_after and not stopped:
                            stopped = True
                            say(
                                f"regenerate: {consecutive_failures} rows failed in a row; stopping "
                                "(the rows in flight finish)"
                            )
                        continue
                    consecutive_failures = 0
                    run.write(index, row, answer.messages)
                    stats.turns_generated += answer.turns
                    stats.tokens_generated += answer.tokens
                    stats.responses_retokenised += answer.retokenised
                    if answer.retokenised and not warned:
                        warned = True
                        say(
                            "warning: the server returned no token ids (vLLM returns them for "
                            "return_token_ids); re-tokenising its text with the target's tokenizer, "
                            "which may not give the ids it generated"
                        )
                    written += 1
                if written:
                    run.commit(written)
                elapsed = time.perf_counter() - started
                run.bar.set_postfix_str(f"{server.requests / max(elapsed, 1e-9):.1f} req/s", refresh=False)
        except BaseException:
            # Ctrl-C or an error: keep the rows that finished behind an unfinished one (resuming skips
            # exactly the rows on disk, in any order), and do not wait for the requests in flight.
            saved = 0
            for index, row, future in window:
                if future.done() and not future.cancelled() and future.exception() is None:
                    run.write(index, row, future.result().messages)
                    saved += 1
            run.commit(saved)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    stats.requests = server.requests
    stats.retries = server.retried
    if stats.failures:
        unsent = "; the rows after them were not sent" if stopped else ""
        raise RegenerateFailedError(
            "\n".join(
                [
                    f"{stats.rows_failed} rows failed{unsent}; "
                    f"{stats.rows_written} rows were written to {output_path}. Run the same command again "
                    "to retry the missing rows:",
                    *stats.failures[:20],
                    *([f"... and {len(stats.failures) - 20} more"] if len(stats.failures) > 20 else []),
                ]
            )
        )
    return stats
