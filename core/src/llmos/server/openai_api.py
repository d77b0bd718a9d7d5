"""The OpenAI-compatible API, so every OpenAI client works against llmos.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream:
true`` as server-sent events), ``/v1/embeddings``, and llmos's own
``/api/classify``. Requests are validated with caps before they reach a
model; every call goes through the kernel (resolution, batching, events).
Responses carry ``x-llmos-overhead-ms``: the time the request spent in llmos
outside the model and its queue.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmos.errors import UsageError
from llmos.runtime.kernel import Kernel
from llmos.runtime.worker import StreamHandle
from llmos.types import (
    Budget,
    Capability,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    Sampling,
    StreamChunk,
    Usage,
)

T = TypeVar("T")


class LlmosIn(BaseModel):
    """llmos's own request fields, under ``"llmos"`` (OpenAI clients send
    them as ``extra_body``): a fusion's budget."""

    model_config = ConfigDict(extra="forbid")

    max_members: int | None = Field(
        default=None, ge=1, description="A fusion asks at most this many members"
    )
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="A fusion answers with what it has after this long"
    )

    def budget(self) -> Budget | None:
        if self.max_members is None and self.max_latency_ms is None:
            return None
        return Budget(max_members=self.max_members, max_latency_ms=self.max_latency_ms)


class _Body(BaseModel):
    # OpenAI clients send fields llmos does not use (user, metadata …):
    # accept and ignore them rather than break the client.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    llmos: LlmosIn | None = None

    def budget(self) -> Budget | None:
        return None if self.llmos is None else self.llmos.budget()


def _meta(result: Any) -> dict[str, Any]:
    """``{"llmos": {"meta": ...}}`` for a result that carries meta (a fusion's
    accounting), else nothing: plain answers keep OpenAI's exact shape."""
    meta = getattr(result, "meta", None)
    return {"llmos": {"meta": dict(meta)}} if meta else {}


class _Sampled(_Body):
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UsageError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionBody(_Sampled):
    messages: list[ChatMessageIn] = Field(min_length=1)


class CompletionBody(_Sampled):
    prompt: str | list[str]


class EmbeddingBody(_Body):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class ClassifyBody(_Body):
    texts: list[str] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list, max_length=100)


class _Caps:
    def __init__(self, kernel: Kernel) -> None:
        api = kernel.config.section("api")
        self.max_tokens = int(api.get("max_tokens", 4096))
        self.max_n = int(api.get("max_n", 8))
        self.max_chars = int(api.get("max_prompt_chars", 200_000))
        self.max_inputs = int(api.get("max_inputs", 256))

    def count(self, count: int, param: str) -> None:
        if count > self.max_inputs:
            raise UsageError(
                f"{count} inputs in one request; the limit is {self.max_inputs} (api.max_inputs)",
                param=param,
            )

    def texts(self, texts: Sequence[str], param: str) -> None:
        self.count(len(texts), param)
        for text in texts:
            if len(text) > self.max_chars:
                raise UsageError(
                    f"an input of {len(text)} characters is longer than the limit of "
                    f"{self.max_chars} (api.max_prompt_chars)",
                    param=param,
                )

    def sampling(self, body: _Sampled) -> Sampling:
        if body.n > self.max_n:
            raise UsageError(f"n={body.n} is over the limit of {self.max_n} (api.max_n)", param="n")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise UsageError(
                f"max_tokens={max_tokens} is over the limit of {self.max_tokens} (api.max_tokens)",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(stop),
            seed=body.seed,
        )


def _usage(usages: Sequence[Usage]) -> dict[str, int]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _overhead(started: float, timing: dict[str, float]) -> dict[str, str]:
    total = time.perf_counter() - started
    inside = timing.get("model_s", 0.0) + timing.get("queue_wait_s", 0.0)
    return {
        "x-llmos-overhead-ms": f"{max(total - inside, 0.0) * 1000:.3f}",
        "x-llmos-queue-ms": f"{timing.get('queue_wait_s', 0.0) * 1000:.3f}",
        "x-llmos-batch-size": str(int(timing.get("batch_size", 0))),
    }


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream_response(
    kernel: Kernel,
    model: str,
    request: CompletionRequest | ChatRequest,
    envelope: dict[str, Any],
    chat: bool,
) -> StreamingResponse:
    # Resolve, load and queue before the response starts, so that an unknown
    # model or a full queue is an ordinary JSON error, not a broken stream.
    handle = await asyncio.to_thread(kernel.stream, model, request)
    return StreamingResponse(
        _stream_events(kernel, handle, envelope, chat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream_events(
    kernel: Kernel, handle: StreamHandle, envelope: dict[str, Any], chat: bool
) -> AsyncIterator[bytes]:
    try:
        if chat:
            first = {**envelope, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            yield _sse(first)
        while True:
            chunk: StreamChunk | None = await asyncio.to_thread(handle.get, kernel.request_timeout)
            if chunk is None:
                break
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": chunk.text} if chunk.text else {},
                }
            else:
                choice = {"index": 0, "text": chunk.text}
            choice["finish_reason"] = chunk.finish_reason
            event = {**envelope, "choices": [choice]}
            if chunk.usage is not None:
                event["usage"] = _usage([chunk.usage])
            yield _sse(event)
        yield b"data: [DONE]\n\n"
    finally:
        # Also reached when the client disconnects: stop generating for it.
        handle.cancel()


#: nginx's status for "the client closed the request"; nobody reads it
CLIENT_CLOSED = 499


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await ``work``, or cancel it when the client disconnects first.

    Starlette does not cancel a handler whose client went away, so a request
    still queued for a busy model would run for no one. Cancelling the
    kernel call takes it out of the model's queue.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return Response(status_code=CLIENT_CLOSED)


async def _respond(
    kernel: Kernel,
    http: Request,
    model: str,
    capability: Capability,
    requests: Sequence[Any],
    started: float,
    payload: Callable[[list[Any]], dict[str, Any]],
) -> Response:
    """Run the requests through the kernel (cancelled if the client hangs up)
    and answer ``payload(results)`` with the overhead headers."""
    timing: dict[str, float] = {}
    results = await _unless_disconnected(
        http, kernel.acall(model, capability, requests, timing=timing)
    )
    if isinstance(results, Response):
        return results
    return JSONResponse(payload(results), headers=_overhead(started, timing))


def openai_router(kernel: Kernel) -> APIRouter:
    """The OpenAI-compatible routes and ``/api/classify`` over ``kernel``."""
    router = APIRouter(tags=["openai-compatible"])
    caps = _Caps(kernel)

    @router.get("/v1/models", summary="List the models a client can use")
    def list_models() -> dict[str, Any]:
        data: list[dict[str, Any]] = []
        for name in kernel.config.section("groups"):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "group"})
        for name, table in kernel.config.section("models").items():
            owner = table.get("provider", "config") if isinstance(table, dict) else "config"
            data.append({"id": name, "object": "model", "created": 0, "owned_by": owner})
        cursor = None
        while True:
            page = kernel.registry.store.search("", sort="name", limit=1000, cursor=cursor)
            for hit in page.items:
                card = hit.card
                data.append(
                    {
                        "id": card.name,
                        "object": "model",
                        "created": int(card.created_at.timestamp()),
                        "owned_by": card.provider,
                    }
                )
            if not (cursor := page.next_cursor):
                break
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions", summary="Chat (OpenAI-compatible)", response_model=None)
    async def chat_completions(body: ChatCompletionBody, http: Request) -> Response:
        started = time.perf_counter()
        messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
        caps.texts([m.content for m in messages], "messages")
        request = ChatRequest(messages=messages, sampling=caps.sampling(body), budget=body.budget())
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            if body.n != 1:
                raise UsageError("stream with n > 1 is not supported", param="n")
            chunk_envelope = {**envelope, "object": "chat.completion.chunk"}
            return await _stream_response(kernel, body.model, request, chunk_envelope, chat=True)

        def payload(results: list[ChatResult]) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.message.content},
                    "finish_reason": r.finish_reason,
                    **_meta(r),
                }
                for i, r in enumerate(results)
            ]
            return {**envelope, "choices": choices, "usage": _usage([r.usage for r in results])}

        return await _respond(
            kernel, http, body.model, Capability.CHAT, [request] * body.n, started, payload
        )

    @router.post(
        "/v1/completions", summary="Complete text (OpenAI-compatible)", response_model=None
    )
    async def completions(body: CompletionBody, http: Request) -> Response:
        started = time.perf_counter()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise UsageError("prompt is empty", param="prompt")
        caps.texts(prompts, "prompt")
        sampling = caps.sampling(body)
        requests = [
            CompletionRequest(prompt=p, sampling=sampling, budget=body.budget())
            for p in prompts
            for _ in range(body.n)
        ]
        caps.count(len(requests), "n")  # n times the prompts is capped too
        envelope = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            if len(requests) != 1:
                raise UsageError("stream takes one prompt and n = 1", param="stream")
            return await _stream_response(kernel, body.model, requests[0], envelope, chat=False)

        def payload(results: list[CompletionResult]) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "logprobs": None,
                    **_meta(r),
                }
                for i, r in enumerate(results)
            ]
            return {**envelope, "choices": choices, "usage": _usage([r.usage for r in results])}

        return await _respond(
            kernel, http, body.model, Capability.COMPLETE, requests, started, payload
        )

    @router.post("/v1/embeddings", summary="Embed texts (OpenAI-compatible)", response_model=None)
    async def embeddings(body: EmbeddingBody, http: Request) -> Response:
        started = time.perf_counter()
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise UsageError("input is empty", param="input")
        caps.texts(texts, "input")

        def payload(results: list[EmbedResult]) -> dict[str, Any]:
            data = []
            for i, result in enumerate(results):
                vector = list(result.vector)
                if body.dimensions is not None:
                    if not 1 <= body.dimensions <= len(vector):
                        raise UsageError(
                            f"dimensions must be between 1 and {len(vector)}", param="dimensions"
                        )
                    vector = vector[: body.dimensions]
                embedding: Any = (
                    base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                    if body.encoding_format == "base64"
                    else vector
                )
                data.append(
                    {"object": "embedding", "index": i, "embedding": embedding, **_meta(result)}
                )
            usage = _usage([r.usage for r in results])
            return {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {
                    "prompt_tokens": usage["prompt_tokens"],
                    "total_tokens": usage["total_tokens"],
                },
            }

        requests = [EmbedRequest(text=t, budget=body.budget()) for t in texts]
        return await _respond(
            kernel, http, body.model, Capability.EMBED, requests, started, payload
        )

    @router.post("/api/classify", summary="Label scores for a batch of texts", response_model=None)
    async def classify(body: ClassifyBody, http: Request) -> Response:
        started = time.perf_counter()
        caps.texts(body.texts, "texts")

        def payload(results: list[ClassifyResult]) -> dict[str, Any]:
            return {
                "model": body.model,
                "results": [
                    {"label": r.label, "scores": dict(r.scores), **_meta(r)} for r in results
                ],
                "usage": _usage([r.usage for r in results]),
            }

        requests = [
            ClassifyRequest(text=t, labels=tuple(body.labels), budget=body.budget())
            for t in body.texts
        ]
        return await _respond(
            kernel, http, body.model, Capability.CLASSIFY, requests, started, payload
        )

    return router
