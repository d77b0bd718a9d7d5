"""A model served by a server that speaks the OpenAI API.

One loaded model is one pooled ``httpx.Client`` (keep-alive, at most
``max_connections`` connections) pointed at the card's base URL, plus a small
thread pool. The kernel gives each model one worker thread and groups the
requests that queue while it is busy into one call (``max_batch_size``,
here ``max_connections``); this model sends the requests of such a batch to
the upstream at the same time, one HTTP request each on its own pooled
connection — except embeddings, which the OpenAI API takes as a list and so
go as one request. The upstream batches on its own (vLLM, OpenAI): what the
kernel's batching buys here is concurrency, without ``max_wait_ms`` delay.

Nothing in a request reaches the URL or the headers: the path is fixed per
capability, the upstream model id comes from the card, and the request
types (``ChatRequest`` …) carry no place for a URL, a header or a key.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import structlog

from llmos.errors import CapabilityNotSupported, LlmosError, Unavailable
from llmos.types import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    ModelBase,
    ModelCard,
    Sampling,
    StreamChunk,
    Usage,
)
from llmos_openai import __version__
from llmos_openai.settings import Settings
from llmos_openai.transport import (
    Resolver,
    build_client,
    from_status,
    from_transport_error,
    guard_for,
)

__all__ = ["OpenAICompatible"]

log = structlog.get_logger("llmos_openai")

R = TypeVar("R")

#: how long answers of a partly failed batch are kept for the kernel's retry
_SALVAGE_S = 5.0


#: a request of a partly failed batch that failed: it is sent again
_RESEND = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class OpenAICompatible(ModelBase):
    """Complete, chat, stream and embed through an OpenAI-compatible server."""

    #: token-id prompts, echo and logprobs are not passed on: vendors differ
    #: (most chat-only APIs have no completions logprobs, many no token ids),
    #: so the kernel refuses them with a 400 rather than answer without them
    supports_logprobs = False

    def __init__(
        self, card: ModelCard, settings: Settings, *, resolve: Resolver | None = None
    ) -> None:
        super().__init__(card)
        self.settings = settings
        self.capabilities = settings.capabilities
        #: one batch's requests go out at once, one connection each
        self.max_batch_size = settings.max_connections
        #: a remote model holds no weights: never the reason to unload a local one
        self.memory_bytes = 0
        self._backend = guard_for(settings.host, resolve)
        self._client = build_client(settings, self._backend, f"llmos-openai/{__version__}")
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        #: id(request) -> (request, when, result) of a batch that partly failed
        self._salvage: dict[int, tuple[Any, float, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"OpenAICompatible({self.card.ref!r}, {self.settings.base_url!r},"
            f" model={self.settings.upstream_model!r}, key={self.settings.key_source!r})"
        )

    @property
    def connections_opened(self) -> int:
        """TCP connections opened to the upstream so far (the pool reuses them)."""
        return self._backend.opened

    # -- capabilities -------------------------------------------------------

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        for request in requests:
            if request.score_continuations:
                raise CapabilityNotSupported(
                    f"model {self.card.ref!r} cannot score continuations: the OpenAI API returns"
                    " no log-probabilities of given texts (zero-shot classification and"
                    " ranking need them); use a local provider such as transformers"
                )
        return self._each(self._complete_one, requests)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        return self._each(self._chat_one, requests)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        # The API takes a list: one upstream request for the whole batch.
        data = self._post(
            "embeddings",
            {
                "model": self.settings.upstream_model,
                "input": [r.text for r in requests],
                "encoding_format": "float",
            },
        )
        rows = data.get("data")
        if not isinstance(rows, list) or len(rows) != len(requests):
            raise self._malformed("embeddings", f"expected {len(requests)} embeddings")
        try:
            ordered = sorted(rows, key=lambda row: int(row.get("index", 0)))
            vectors = [tuple(float(x) for x in row["embedding"]) for row in ordered]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise self._malformed("embeddings", "an embedding is not a list of numbers") from None
        usage = _usage(data.get("usage"))
        # Usage is the batch's; each result gets its share so totals add up.
        shares = _split(usage.prompt_tokens, len(requests))
        return [
            EmbedResult(vector=vector, usage=Usage(prompt_tokens=share))
            for vector, share in zip(vectors, shares, strict=True)
        ]

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        for index, request in enumerate(requests):
            yield from self._stream_one(index, request)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            self._salvage.clear()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- one request --------------------------------------------------------

    def _complete_one(self, request: CompletionRequest) -> CompletionResult:
        payload = self._completion_payload(request)
        data = self._post("completions", payload, self._without_limit(request, payload))
        choice = self._choice(data, "completions")
        text = choice.get("text")
        if not isinstance(text, str):
            raise self._malformed("completions", "a choice has no text")
        return CompletionResult(
            text=text,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=_usage(data.get("usage")),
        )

    def _chat_one(self, request: ChatRequest) -> ChatResult:
        payload = self._chat_payload(request)
        data = self._post("chat/completions", payload, self._without_limit(request, payload))
        choice = self._choice(data, "chat/completions")
        message = choice.get("message")
        if not isinstance(message, Mapping):
            raise self._malformed("chat/completions", "a choice has no message")
        return ChatResult(
            message=ChatMessage("assistant", _text(message.get("content"))),
            finish_reason=choice.get("finish_reason") or "stop",
            usage=_usage(data.get("usage")),
        )

    def _stream_one(
        self, index: int, request: CompletionRequest | ChatRequest
    ) -> Iterator[StreamChunk]:
        chat = isinstance(request, ChatRequest)
        path = "chat/completions" if chat else "completions"
        payload = self._chat_payload(request) if chat else self._completion_payload(request)  # type: ignore[arg-type]
        payload["stream"] = True
        if self.settings.stream_usage:
            payload["stream_options"] = {"include_usage": True}
        unlimited = self._without_limit(request, payload)
        finish: str | None = None
        usage: Usage | None = None
        try:
            response = self._open_stream(path, payload, unlimited)
            try:
                done = False
                for line in response.iter_lines():
                    # Read to the end even after [DONE]: a response read to
                    # its end gives its connection back to the pool.
                    if done or not line.startswith("data:"):
                        continue  # blank lines, comments, "event:" fields
                    text = line[5:].strip()
                    if text == "[DONE]":
                        done = True
                        continue
                    try:
                        event = json.loads(text)
                    except ValueError:
                        raise self._malformed(path, "a stream event is not JSON") from None
                    if not isinstance(event, Mapping):
                        raise self._malformed(path, "a stream event is not an object")
                    if event.get("error"):
                        raise self._stream_error(event, path)
                    if event.get("usage"):
                        usage = _usage(event["usage"])
                    for choice in event.get("choices") or ():
                        if chat:
                            delta = choice.get("delta") or {}
                            piece = _text(delta.get("content"))
                        else:
                            piece = _text(choice.get("text"))
                        if piece:
                            yield StreamChunk(index=index, text=piece)
                        finish = choice.get("finish_reason") or finish
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise from_transport_error(exc, self.settings) from None
        yield StreamChunk(index=index, text="", finish_reason=finish or "stop", usage=usage)

    # -- payloads -----------------------------------------------------------

    def _sampling(self, sampling: Sampling) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if sampling.max_tokens is not None:
            out[self.settings.max_tokens_param] = sampling.max_tokens
        if sampling.temperature is not None:
            out["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            out["top_p"] = sampling.top_p
        if sampling.stop:
            out["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            out["seed"] = sampling.seed
        return out

    def _completion_payload(self, request: CompletionRequest) -> dict[str, Any]:
        return {
            "model": self.settings.upstream_model,
            "prompt": request.prompt,
            **self._sampling(request.sampling),
        }

    def _chat_payload(self, request: ChatRequest) -> dict[str, Any]:
        return {
            "model": self.settings.upstream_model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            **self._sampling(request.sampling),
        }

    def _without_limit(
        self, request: CompletionRequest | ChatRequest, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        """``payload`` without its max tokens when that is only the daemon's
        limit (``[api] max_tokens``; the request asked for none), else ``None``.

        The limit is sent, so that the upstream stops there with
        finish_reason "length" like a local model. An upstream may refuse
        it where it would take the request without it: a model whose context
        cannot hold prompt + limit, or whose output maximum is below the
        limit (vLLM, OpenAI: 400 "maximum context length"). The request is
        then sent once more without it (:meth:`_limit_refused`), and the
        upstream's own default — the rest of that context, or that maximum,
        both below the limit — bounds the answer.
        """
        param = self.settings.max_tokens_param
        if not request.sampling.max_tokens_is_limit or param not in payload:
            return None
        return {key: value for key, value in payload.items() if key != param}

    def _limit_refused(self, response: httpx.Response, path: str) -> bool:
        """Whether the upstream refused a request whose max tokens it was
        sent only as the daemon's limit, for its tokens (a 400 or 422 whose
        message speaks of tokens): it is sent once more without them."""
        if response.status_code not in (400, 422) or b"token" not in response.content.lower():
            return False
        log.info(
            "openai.limit_refused",
            model=self.card.ref,
            upstream=self.settings.netloc,
            path=path,
            status=response.status_code,
            hint=f"the upstream refused {self.settings.max_tokens_param} set to [api]"
            " max_tokens (the request set none); sent again without it. If it refused the"
            " parameter's name, set the card's options.max_tokens_param",
        )
        return True

    def _open_stream(
        self, path: str, payload: dict[str, Any], unlimited: dict[str, Any] | None
    ) -> httpx.Response:
        """The upstream's streamed answer to ``payload`` (to ``unlimited``,
        when the upstream refused the limit in ``payload``), its status checked."""
        while True:
            request = self._client.build_request("POST", path, content=_json(payload))
            response = self._client.send(request, stream=True)
            if response.status_code < 300:
                return response
            try:
                response.read()
            finally:
                response.close()
            if unlimited is not None and self._limit_refused(response, path):
                payload, unlimited = unlimited, None
                continue
            raise self._status_error(response, path)

    # -- HTTP ---------------------------------------------------------------

    def _post(
        self, path: str, payload: dict[str, Any], unlimited: dict[str, Any] | None = None
    ) -> Mapping[str, Any]:
        """The upstream's answer to ``payload``; to ``unlimited`` (the same
        without the daemon's limit on its tokens) when it refused that limit."""
        try:
            response = self._client.post(path, content=_json(payload))
            if unlimited is not None and self._limit_refused(response, path):
                response = self._client.post(path, content=_json(unlimited))
        except httpx.HTTPError as exc:
            raise from_transport_error(exc, self.settings) from None
        if response.status_code >= 300:
            raise self._status_error(response, path)
        try:
            data = json.loads(response.content)
        except ValueError:
            raise self._malformed(path, "the answer is not JSON") from None
        if not isinstance(data, Mapping):
            raise self._malformed(path, "the answer is not a JSON object")
        return data

    def _status_error(self, response: httpx.Response, path: str) -> LlmosError:
        log.debug(
            "openai.upstream_error",
            model=self.card.ref,
            upstream=self.settings.netloc,
            path=path,
            status=response.status_code,
        )
        return from_status(
            response.status_code, response.content, response.headers, self.settings, path
        )

    def _stream_error(self, event: Mapping[str, Any], path: str) -> LlmosError:
        error = event.get("error")
        code = error.get("code") if isinstance(error, Mapping) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        return from_status(status, json.dumps(event, default=str), {}, self.settings, path)

    def _choice(self, data: Mapping[str, Any], path: str) -> Mapping[str, Any]:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            raise self._malformed(path, "no choices")
        return choices[0]

    def _malformed(self, path: str, what: str) -> Unavailable:
        return Unavailable(
            f"upstream {self.settings.netloc} answered /{path} with something that is not an"
            f" OpenAI response ({what})"
        )

    # -- a batch: concurrent, and no request sent twice ----------------------

    def _each(self, send: Callable[[Any], R], requests: Sequence[Any]) -> list[R]:
        """``send`` each request, all at once; raise the first failure.

        When a batch of several callers' requests partly fails, the kernel
        runs each caller's requests again on their own. The answers that did
        come back are kept for that retry (for a few seconds, matched by
        object identity) so that no request is sent — and paid for — twice.
        """
        outcomes: list[Any] = [None] * len(requests)
        if self._salvage:
            self._take_salvage(requests, outcomes)
        todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if len(todo) == 1:
            outcomes[todo[0]] = _attempt(send, requests[todo[0]])
        elif todo:
            executor = self._pool()
            futures = [(i, executor.submit(_attempt, send, requests[i])) for i in todo[1:]]
            outcomes[todo[0]] = _attempt(send, requests[todo[0]])
            for i, future in futures:
                outcomes[i] = future.result()
        failures = [o.error for o in outcomes if isinstance(o, _Failed)]
        if not failures:
            return outcomes
        if len(requests) > 1 and len(failures) < len(requests):
            now = time.monotonic()
            with self._lock:
                for request, outcome in zip(requests, outcomes, strict=True):
                    # A failed request is remembered too (to send again), so
                    # that its retry is known to be part of the same sequence.
                    kept = _RESEND if isinstance(outcome, _Failed) else outcome
                    self._salvage[id(request)] = (request, now, kept)
        raise failures[0]

    def _take_salvage(self, requests: Sequence[Any], outcomes: list[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            found = False
            for i, request in enumerate(requests):
                kept = self._salvage.get(id(request))
                if kept is not None and kept[0] is request and now - kept[1] < _SALVAGE_S:
                    del self._salvage[id(request)]
                    if kept[2] is not _RESEND:
                        outcomes[i] = kept[2]
                    found = True
            if not found:
                # The kernel's retry is over (it comes at once): forget the rest.
                self._salvage.clear()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=max(self.settings.max_connections - 1, 1),
                    thread_name_prefix=f"llmos-openai-{self.card.name}",
                )
            return self._executor


def _attempt(send: Callable[[Any], R], request: Any) -> R | _Failed:
    try:
        return send(request)
    except Exception as exc:
        return _Failed(exc)


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _usage(value: Any) -> Usage:
    if not isinstance(value, Mapping):
        return Usage()

    def count(name: str) -> int:
        number = value.get(name)
        return number if isinstance(number, int) and number >= 0 else 0

    return Usage(prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
