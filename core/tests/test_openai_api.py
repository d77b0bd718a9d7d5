"""The OpenAI-compatible API, driven by the official ``openai`` client.

The model is a small deterministic provider registered in-process, so every
answer can be checked exactly; the real-model end-to-end tests live with the
transformers plugin. Everything between the client and the model is real: the
daemon on loopback, middleware, kernel resolution, batching and events.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from llmos.config import load_config
from llmos.plugin import hookimpl
from llmos.runtime.kernel import KERNEL_SECTIONS, Kernel
from llmos.runtime.limits import queued_cap
from llmos.testing import EventRecorder, serve_in_thread
from llmos.types import (
    CallAbandoned,
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
    ModelBase,
    ModelCard,
    ProviderSpec,
    StreamChunk,
    ToolCall,
    Usage,
    cancel_event,
)


def words_of(text: str, limit: int | None) -> tuple[list[str], str]:
    words = text.split()
    if limit is not None and len(words) > limit:
        return words[:limit], "length"
    return words, "stop"


def vector_of(text: str) -> list[float]:
    raw = [float(text.count(c) + 1) for c in "aeioustnr"]
    norm = math.sqrt(sum(v * v for v in raw))
    return [v / norm for v in raw]


class Parrot(ModelBase):
    """Completes with the prompt reversed word by word; chats by echoing."""

    capabilities = frozenset(Capability)
    #: every prompt a completion was computed for, in order
    seen: list[str] = []

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.delay = float(card.options.get("delay", 0))
        # a model that takes a while to load, as a real one does
        time.sleep(float(card.options.get("load_delay", 0)))

    def _answer(self, request: CompletionRequest | ChatRequest) -> tuple[str, str, Usage]:
        if isinstance(request, ChatRequest) and request.messages[-1].content == "sampling?":
            # what the model was asked to sample with, to check what the route sends
            sampling = request.sampling
            source = f"t={sampling.temperature} p={sampling.top_p} seed={sampling.seed}"
        elif isinstance(request, ChatRequest):
            source = "you said " + request.messages[-1].content
        else:
            source = " ".join(reversed(request.prompt.split()))
        words, finish = words_of(source, request.sampling.max_tokens)
        usage = Usage(prompt_tokens=len(source.split()), completion_tokens=len(words))
        return " ".join(words), finish, usage

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        Parrot.seen.extend(r.prompt for r in requests)
        time.sleep(self.delay)
        out = []
        for r in requests:
            text, finish, usage = self._answer(r)
            out.append(CompletionResult(text=text, finish_reason=finish, usage=usage))
        return out

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        out = []
        for r in requests:
            text, finish, usage = self._answer(r)
            out.append(
                ChatResult(
                    message=ChatMessage("assistant", text), finish_reason=finish, usage=usage
                )
            )
        return out

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        (request,) = requests
        text, finish, usage = self._answer(request)
        words = text.split()
        for i, word in enumerate(words):
            yield StreamChunk(index=0, text=word if i == 0 else " " + word)
        yield StreamChunk(index=0, text="", finish_reason=finish, usage=usage)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        for r in requests:
            r.text.encode()  # what every tokenizer does first (a lone surrogate fails here)
        return [
            EmbedResult(vector=vector_of(r.text), usage=Usage(prompt_tokens=1)) for r in requests
        ]

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        out = []
        for r in requests:
            for text in (r.text, *r.labels):
                text.encode()  # as a tokenizer would
            good = 0.9 if "good" in r.text else 0.2
            out.append(ClassifyResult(scores={"positive": good, "negative": 1 - good}))
        return out


class Caller(Parrot):
    """The parrot with tools. A chat that may call them calls each tool (the
    named one, only the first without ``parallel_tool_calls``) with
    ``{"said": <the last message>}``, unless ``tool_choice`` is auto and the
    message starts with "just": that it echoes as text. A message starting
    with "slow" takes up to 10 s, stopping when its callers go away, as a
    generating model does."""

    chat_features = frozenset({"tools"})
    #: the messages whose chat stopped because every caller went away
    abandoned: list[str] = []

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        out = []
        for r in requests:
            said = r.messages[-1].content
            if said.startswith("slow"):
                self._take_a_while(said)
            if not r.may_call_tools or (r.tool_choice == "auto" and said.startswith("just")):
                out.extend(super().chat([r]))
                continue
            tools = [t for t in r.tools if r.tool_name in (None, t.name)]
            calls = tuple(
                ToolCall(id=f"call_{i}_{t.name}", name=t.name, arguments=json.dumps({"said": said}))
                for i, t in enumerate(tools if r.parallel_tool_calls else tools[:1])
            )
            out.append(
                ChatResult(
                    message=ChatMessage("assistant", "", tool_calls=calls),
                    finish_reason="tool_calls",
                    usage=Usage(prompt_tokens=len(said.split()), completion_tokens=9),
                )
            )
        return out

    def _take_a_while(self, said: str) -> None:
        cancel = cancel_event()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                Caller.abandoned.append(said)
                raise CallAbandoned("every caller went away")
            time.sleep(0.01)


class ParrotPlugin:
    @hookimpl
    def llmos_register_providers(self, register):
        register(ProviderSpec(name="parrot", load=lambda request: Parrot(request.card)))
        register(ProviderSpec(name="caller", load=lambda request: Caller(request.card)))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kernel, str]]:
    home = tmp_path_factory.mktemp("home")
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": ""},
            overrides=[
                'models.parrot.provider="parrot"',
                'models.slow.provider="parrot"',
                "models.slow.options.delay=0.5",
                "models.slow.max_queue=1",
                "models.slow.max_batch_size=1",
                'models.slow2.provider="parrot"',
                "models.slow2.options.delay=0.5",
                "models.slow2.max_batch_size=1",
                'models.lazy.provider="parrot"',
                "models.lazy.options.load_delay=0.5",
                'groups.flock.deployments=["parrot"]',
                "api.max_tokens=64",
                "api.max_inputs=4",
            ],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(ParrotPlugin(), "parrot-plugin")
    with serve_in_thread(kernel) as url:
        kernel.registry.register(ModelCard(name="acme/parrot", provider="parrot"))
        yield kernel, url


@pytest.fixture
def client(daemon: tuple[Kernel, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon[1] + "/v1", api_key="unused", max_retries=0)


def test_models_lists_deployments_and_registered_models(client: openai.OpenAI) -> None:
    ids = {m.id: m.owned_by for m in client.models.list()}
    assert ids["parrot"] == "parrot" and ids["acme/parrot"] == "parrot"


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="parrot",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
        ],
    )
    assert reply.choices[0].message.content == "you said hi there"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 4)
    assert reply.model == "parrot" and reply.id.startswith("chatcmpl-")


def test_chat_streaming_matches_the_plain_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "one two three"}]
    plain = client.chat.completions.create(model="acme/parrot", messages=messages)
    chunks = list(
        client.chat.completions.create(model="acme/parrot", messages=messages, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content == "you said one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_batch_and_max_tokens(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="parrot", prompt=["a b c", "d e"], max_tokens=2)
    assert [(c.text, c.finish_reason) for c in reply.choices] == [
        ("c b", "length"),
        ("e d", "stop"),
    ]
    streamed = list(client.completions.create(model="parrot", prompt="x y z", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "z y x"


def test_embeddings_in_both_encodings(client: openai.OpenAI, daemon) -> None:
    # the openai client asks for base64 and decodes it
    reply = client.embeddings.create(model="parrot", input=["banana", "tea"])
    for item, text in zip(reply.data, ["banana", "tea"], strict=True):
        assert item.embedding == pytest.approx(vector_of(text), rel=1e-6)
    raw = httpx.post(
        daemon[1] + "/v1/embeddings",
        json={"model": "parrot", "input": "tea", "encoding_format": "float"},
    ).json()
    assert raw["data"][0]["embedding"] == pytest.approx(vector_of("tea"))


def test_classify_route(daemon) -> None:
    response = httpx.post(
        daemon[1] + "/api/classify", json={"model": "parrot", "texts": ["good film", "dull"]}
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["label"] for r in results] == ["positive", "negative"]
    assert float(response.headers["x-llmos-overhead-ms"]) >= 0


def test_unknown_model_is_404_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
    assert "'ghost' not found" in caught.value.message
    assert "/v1/models" in caught.value.message
    # OpenAI's type and code, not the HTTP status as a number
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", "model_not_found")
    assert caught.value.param == "model"


def test_models_retrieve_finds_what_the_list_names(client: openai.OpenAI) -> None:
    """``client.models.retrieve`` for every kind of model ``/v1/models``
    lists — a group, a deployment, a registered name with ``/``, a version and
    an alias — and a 404 in OpenAI's shape for the rest."""
    listed = {m.id: m for m in client.models.list()}
    for model_id in ("flock", "parrot", "acme/parrot"):
        model = client.models.retrieve(model_id)
        assert model.model_dump() == listed[model_id].model_dump()
    assert listed["flock"].owned_by == "group"
    versioned = client.models.retrieve("acme/parrot@1")
    assert (versioned.id, versioned.object, versioned.owned_by) == (
        "acme/parrot@1",
        "model",
        "parrot",
    )
    assert versioned.created == listed["acme/parrot"].created > 0
    assert client.models.retrieve("acme/parrot@latest").id == "acme/parrot@latest"
    for ghost in ("ghost", "acme/parrot@9", "acme/ghost@prod", "Not A Name"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(ghost)
        error = caught.value
        assert (error.type, error.code) == ("invalid_request_error", "model_not_found")
        assert "GET /v1/models" in caught.value.message


def test_an_omitted_temperature_samples_as_openai_does(client: openai.OpenAI) -> None:
    """OpenAI's default temperature (1) reaches the model when a request
    leaves it out (top_p stays unset: every provider reads that as OpenAI's
    1); what is given is passed on."""
    ask = [{"role": "user", "content": "sampling?"}]
    default = client.chat.completions.create(model="parrot", messages=ask)
    assert default.choices[0].message.content == "t=1.0 p=None seed=None"
    given = client.chat.completions.create(
        model="parrot", messages=ask, temperature=0, top_p=0.5, seed=3
    )
    assert given.choices[0].message.content == "t=0.0 p=0.5 seed=3"


def test_n_choices_get_their_own_seeds(client: openai.OpenAI) -> None:
    """Each of n choices samples with a seed of its own (seed + i), so that
    they differ; the first keeps the request's seed (n=1 answers as before)."""
    ask = [{"role": "user", "content": "sampling?"}]
    reply = client.chat.completions.create(model="parrot", messages=ask, n=3, seed=7)
    seeds = [c.message.content.rsplit("=", 1)[1] for c in reply.choices]
    assert seeds == ["7", "8", "9"]
    # the seed wraps within int64 instead of overflowing
    top = client.chat.completions.create(model="parrot", messages=ask, n=2, seed=2**63 - 1)
    assert [c.message.content.rsplit("=", 1)[1] for c in top.choices] == [
        str(2**63 - 1),
        str(-(2**63)),
    ]
    unseeded = client.chat.completions.create(model="parrot", messages=ask, n=2)
    assert [c.message.content for c in unseeded.choices] == ["t=1.0 p=None seed=None"] * 2


def test_a_models_load_is_reported_apart_from_the_overhead(daemon) -> None:
    """The request that loads a model waits for the load: that time is
    ``x-llmos-load-ms``, not overhead; the next request waits for none."""
    body = {"model": "lazy", "prompt": "a b", "max_tokens": 1}
    first = httpx.post(daemon[1] + "/v1/completions", json=body, timeout=30)
    assert first.status_code == 200, first.text
    load = float(first.headers["x-llmos-load-ms"])
    assert load > 0
    assert float(first.headers["x-llmos-overhead-ms"]) < load
    again = httpx.post(daemon[1] + "/v1/completions", json=body, timeout=30)
    assert float(again.headers["x-llmos-load-ms"]) == 0


def test_caps_are_enforced_before_the_model(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match=r"api\.max_tokens"):
        client.chat.completions.create(model="parrot", messages=messages, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match=r"api\.max_n"):
        client.chat.completions.create(model="parrot", messages=messages, n=9)
    with pytest.raises(openai.BadRequestError, match=r"api\.max_inputs"):
        client.embeddings.create(model="parrot", input=["a"] * 5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="parrot", messages=messages, temperature=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="parrot", messages=[])


def test_a_full_queue_answers_429_with_retry_after(daemon) -> None:
    url = daemon[1] + "/v1/completions"
    body = {"model": "slow", "prompt": "a"}
    statuses: list[httpx.Response] = []

    def post() -> None:
        statuses.append(httpx.post(url, json=body, timeout=30))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in statuses)
    assert codes[0] == 200 and 429 in codes
    refused = next(r for r in statuses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")


def test_overhead_header_is_small_and_excludes_the_model(daemon) -> None:
    response = httpx.post(
        daemon[1] + "/v1/completions", json={"model": "parrot", "prompt": "a b", "max_tokens": 1}
    )
    assert response.status_code == 200
    overhead = float(response.headers["x-llmos-overhead-ms"])
    assert overhead >= 0
    assert int(response.headers["x-llmos-batch-size"]) == 1


def test_a_stream_for_an_unknown_model_is_an_ordinary_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="'ghost' not found"):
        client.chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "x"}], stream=True
        )


def test_a_client_that_disconnects_while_queued_costs_the_model_nothing(daemon) -> None:
    url = daemon[1] + "/v1/completions"
    first = threading.Thread(
        target=lambda: httpx.post(url, json={"model": "slow2", "prompt": "kept"}, timeout=30)
    )
    first.start()
    time.sleep(0.1)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(url, json={"model": "slow2", "prompt": "abandoned"}, timeout=0.2)
    first.join()
    time.sleep(0.6)  # long enough for the abandoned one to have run, had it stayed queued
    assert "kept" in Parrot.seen
    assert "abandoned" not in Parrot.seen


# --------------------------------------------------------------------------
# What a request may say: strict types, no field llmos would ignore, text
# that is Unicode, limits that hold (issue 14, items 4, 6 and 7)
# --------------------------------------------------------------------------


def post(url: str, path: str, body: dict) -> httpx.Response:
    """``body`` as JSON the way a client may write it: with ``\\ud800``
    escapes and NaN left as they are (httpx would refuse to encode them)."""
    raw = json.dumps(body, ensure_ascii=True).encode()
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"})


def refused(response: httpx.Response, param: str) -> str:
    """The message of a 400 in the daemon's error shape that names ``param``."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error["message"]


CHAT = {"model": "parrot", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/chat/completions", {"logit_bias": {"50256": -100}}),
        ("/v1/chat/completions", {"presence_penalty": 0.5}),
        ("/v1/chat/completions", {"frequency_penalty": -1}),
        ("/v1/chat/completions", {"reasoning_effort": "low"}),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}),
        ("/v1/completions", {"best_of": 3}),
        ("/v1/completions", {"suffix": "end"}),
    ],
)
def test_a_field_llmos_does_not_implement_is_refused_naming_it(daemon, path, extra) -> None:
    body = {**CHAT} if "chat" in path else {"model": "parrot", "prompt": "a b"}
    (field,) = extra
    message = refused(post(daemon[1], path, {**body, **extra}), field)
    assert message.startswith(f"{field} is not supported by llmos (yet)")


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"logprobs": 0}, "logprobs"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ],
)
def test_logprobs_echo_and_token_ids_are_refused_by_a_model_that_cannot(
    daemon, path, extra, param
) -> None:
    """The parrot's provider does not declare ``supports_logprobs``: the
    kernel refuses, naming the field, rather than let it answer without."""
    body = {**CHAT} if "chat" in path else {"model": "parrot", "prompt": "a b"}
    message = refused(post(daemon[1], path, {**body, **extra}), param)
    assert "does not support" in message and "supports_logprobs" in message


ARRAY = {"type": "array"}
NAMED_G = {"type": "function", "function": {"name": "g"}}


def schema_format(spec: dict) -> dict:
    return {"type": "json_schema", "json_schema": spec}


TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": schema_format({"name": "x", "schema": {}})},
            "response_format",
        ),
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
    ],
)
def test_structured_output_and_tools_are_refused_by_a_model_that_cannot(
    daemon, extra, param
) -> None:
    # the table provider declares no chat_features: a 400 naming the field,
    # never a 200 with free text where JSON or a tool call was asked for
    message = refused(post(daemon[1], "/v1/chat/completions", {**CHAT, **extra}), param)
    assert f"model 'parrot' does not support {param}" in message
    # a deployment group too (its deployments may differ), streamed or not
    flock = {**CHAT, "model": "flock", **extra}
    message = refused(post(daemon[1], "/v1/chat/completions", flock), param)
    assert "model 'flock' is a deployment group" in message
    streamed = {**CHAT, "stream": True, **extra}
    message = refused(post(daemon[1], "/v1/chat/completions", streamed), param)
    assert f"model 'parrot' does not support {param}" in message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": NAMED_G}, "tool_choice"),
        ({"tools": [TOOL, TOOL]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": schema_format({"schema": {}})},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": schema_format({"name": "x", "shema": {}})},
            "response_format.json_schema.shema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": ARRAY}}]},
            "tools",
        ),
    ],
)
def test_malformed_tools_and_response_formats_are_refused(daemon, extra, param) -> None:
    refused(post(daemon[1], "/v1/chat/completions", {**CHAT, **extra}), param)


def test_an_assistant_message_with_tool_calls_and_no_content_is_accepted(daemon) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": "ok"},
    ]
    reply = post(daemon[1], "/v1/chat/completions", {**CHAT, "messages": messages})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "you said ok"
    # tool_choice "none" and text are what a model without tools serves
    plain = {**CHAT, "tool_choice": "none", "response_format": {"type": "text"}}
    assert post(daemon[1], "/v1/chat/completions", plain).status_code == 200
    # null content anywhere else is refused
    user = [{"role": "user", "content": None}]
    refused(post(daemon[1], "/v1/chat/completions", {**CHAT, "messages": user}), "messages")


def test_the_openai_client_refused_and_its_defaults_accepted(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="parrot", messages=messages, logit_bias={"1": 5})
    assert caught.value.param == "logit_bias"
    assert "logit_bias is not supported by llmos (yet)" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="temprature: unknown field"):
        client.chat.completions.create(
            model="parrot", messages=messages, extra_body={"temprature": 0.2}
        )
    # every OpenAI default given explicitly, as clients and frameworks do, and
    # the fields they send that cannot change the answer
    reply = client.chat.completions.create(
        model="parrot",
        messages=messages,
        n=None,  # sent as null
        temperature=0,  # an integer is a number
        logit_bias={},
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        response_format={"type": "text"},
        parallel_tool_calls=True,
        user="someone",
        metadata={"run": "1"},
        store=False,
        service_tier="auto",
        prompt_cache_key="k",
        stream=False,
    )
    assert reply.choices[0].message.content == "you said hi there"
    # an answer's message object, sent back as the next turn (all its nulls)
    turn = reply.choices[0].message.model_dump()
    again = client.chat.completions.create(
        model="parrot", messages=[*messages, turn, {"role": "user", "content": "ok"}]
    )
    assert again.choices[0].message.content == "you said ok"
    completion = client.completions.create(
        model="parrot", prompt="a b", echo=False, best_of=1, presence_penalty=0, user="u"
    )
    assert completion.choices[0].text == "b a"
    assert client.completions.create(model="parrot", prompt="a b", n=2, best_of=2).choices
    embedded = client.embeddings.create(model="parrot", input="tea", user="u")
    assert embedded.data[0].embedding == pytest.approx(vector_of("tea"), rel=1e-6)


def test_stream_options_include_usage_counts_the_usage_once(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "one two three"}]
    chunks = list(
        client.chat.completions.create(
            model="parrot", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    *choices, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 5)
    assert all(c.usage is None for c in choices)
    assert "".join(c.choices[0].delta.content or "" for c in choices) == "you said one two three"
    streamed = list(
        client.completions.create(
            model="parrot", prompt="x y", stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="only allowed with stream"):
        client.chat.completions.create(
            model="parrot", messages=messages, stream_options={"include_usage": True}
        )


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "n": True}, "n"),
        ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "temperature": float("nan")}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": float("inf")}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "seed": 2**63}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, "seed"),
        (
            "/v1/chat/completions",
            {**CHAT, "llmos": {"max_latency_ms": float("inf")}},
            "llmos.max_latency_ms",
        ),
        ("/v1/chat/completions", {**CHAT, "llmos": {"max_members": "2"}}, "llmos.max_members"),
        ("/v1/chat/completions", {**CHAT, "temprature": 0.2}, "temprature"),
        (
            "/v1/chat/completions",
            {
                "model": "parrot",
                "messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}],
            },
            "messages.0.tool_calls.0.function",
        ),
        (
            "/v1/chat/completions",
            {"model": "parrot", "messages": [{"role": "user", "content": "x", "nmae": "y"}]},
            "messages.0.nmae",
        ),
        ("/v1/completions", {"model": "parrot", "prompt": 5}, "prompt"),
        ("/v1/embeddings", {"model": "parrot", "input": "x", "dimensions": 0}, "dimensions"),
        (
            "/v1/embeddings",
            {"model": "parrot", "input": "x", "encoding_format": "FLOAT"},
            "encoding_format",
        ),
        ("/api/classify", {"model": "parrot", "texts": ["x"], "labels": ["a", ""]}, "labels.1"),
        ("/api/classify", {"model": "parrot", "texts": ["x"], "user": "u"}, "user"),
    ],
)
def test_odd_values_are_a_400_naming_the_field(daemon, path, body, param) -> None:
    refused(post(daemon[1], path, body), param)


def test_the_largest_int64_seed_is_accepted(daemon) -> None:
    response = post(daemon[1], "/v1/chat/completions", {**CHAT, "seed": 2**63 - 1})
    assert response.status_code == 200, response.text


def test_duplicate_classify_labels_are_refused(daemon) -> None:
    body = {"model": "parrot", "texts": ["good"], "labels": ["positive", "negative", "positive"]}
    message = refused(post(daemon[1], "/api/classify", body), "labels")
    assert "'positive' is given twice" in message


def test_classify_work_is_bounded_by_label_length_times_texts(daemon) -> None:
    """Every label is scored after every text: a few long labels times the
    texts took a 2,000-character-capped daemon 61 s (found by the fuzz suite)."""
    limit = 200_000  # api.max_prompt_chars, default; the daemon has api.max_inputs = 4
    one_long = {"model": "parrot", "texts": ["good"], "labels": ["x" * (limit + 1), "y"]}
    assert "(api.max_prompt_chars)" in refused(post(daemon[1], "/api/classify", one_long), "labels")
    labels = ["a" * 60_000, "b" * 60_000, "c" * 60_000, "d" * 60_000]  # each under the limit
    many = {"model": "parrot", "texts": ["good"] * 4, "labels": labels}
    message = refused(post(daemon[1], "/api/classify", many), "labels")
    assert "scores 960016 characters" in message and "limit is 800000" in message
    fits = {"model": "parrot", "texts": ["good"] * 3, "labels": labels}
    assert post(daemon[1], "/api/classify", fits).status_code == 200


LONE = "a\ud800b"  # JSON for a lone high surrogate between two letters
SURROGATE = json.loads(f'"{LONE}"')


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": "parrot", "messages": [{"role": "user", "content": SURROGATE}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "parrot",
                "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}],
            },
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", {**CHAT, "stop": ["x", SURROGATE]}, "stop.1"),
        ("/v1/chat/completions", {**CHAT, "model": SURROGATE}, "model"),
        ("/v1/completions", {"model": "parrot", "prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"model": "parrot", "prompt": ["fine", SURROGATE]}, "prompt.1"),
        ("/v1/embeddings", {"model": "parrot", "input": SURROGATE}, "input"),
        ("/v1/embeddings", {"model": "parrot", "input": ["fine", SURROGATE]}, "input.1"),
        ("/api/classify", {"model": "parrot", "texts": [SURROGATE]}, "texts.0"),
        (
            "/api/classify",
            {"model": "parrot", "texts": ["x"], "labels": ["a", SURROGATE]},
            "labels.1",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(daemon, path, body, param) -> None:
    message = refused(post(daemon[1], path, body), param)
    # pydantic refuses it itself in a field with a length bound (model)
    assert "lone surrogate" in message or "as a unicode string" in message


def test_a_long_conversation_is_not_capped_by_max_inputs(daemon) -> None:
    # api.max_inputs is 4 here; a conversation is one input, whatever its length
    messages = [{"role": "user", "content": f"m{i}"} for i in range(7)]
    response = post(daemon[1], "/v1/chat/completions", {"model": "parrot", "messages": messages})
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The daemon with every [api] and [runtime] limit at its default."""
    home = tmp_path_factory.mktemp("defaults")
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": ""},
            overrides=['models.parrot.provider="parrot"'],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(ParrotPlugin(), "parrot-plugin")
    with serve_in_thread(kernel) as url:
        yield url


def test_one_request_of_max_inputs_works_on_a_default_daemon(default_daemon: str) -> None:
    limit = load_config(env={"LLMOS_LOAD_PLUGINS": ""}, sections=KERNEL_SECTIONS).get(
        "api.max_inputs"
    )
    for path, body in [
        ("/v1/embeddings", {"model": "parrot", "input": ["tea"] * limit}),
        ("/v1/completions", {"model": "parrot", "prompt": ["a b"] * limit}),
        ("/api/classify", {"model": "parrot", "texts": ["good"] * limit}),
    ]:
        response = post(default_daemon, path, body)
        assert response.status_code == 200, response.text
        (field,) = set(body) - {"model"}
        over = post(default_daemon, path, {**body, field: body[field] * 2})
        assert "(api.max_inputs)" in refused(over, field)
    over = post(default_daemon, "/v1/embeddings", {"model": "parrot", "input": ["t"] * (limit + 1)})
    assert f"{limit + 1} inputs in one request; the limit is {limit}" in refused(over, "input")


def test_max_inputs_and_max_n_are_capped_by_the_model_queue() -> None:
    config = load_config(
        env={"LLMOS_LOAD_PLUGINS": ""}, overrides=["runtime.max_queue=8"], sections=KERNEL_SECTIONS
    )
    assert queued_cap(config, "max_inputs", 64) == (
        8,
        "[runtime] max_queue, below api.max_inputs = 64",
    )
    assert queued_cap(config, "max_n", 8) == (8, "api.max_n")
    defaults = load_config(env={"LLMOS_LOAD_PLUGINS": ""}, sections=KERNEL_SECTIONS)
    queue = defaults.get("runtime.max_queue")
    assert queued_cap(defaults, "max_inputs", 64) == (
        defaults.get("api.max_inputs"),
        "api.max_inputs",
    )
    assert defaults.get("api.max_inputs") <= queue and defaults.get("api.max_n") <= queue


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A daemon whose api.max_tokens is 5."""
    home = tmp_path_factory.mktemp("capped")
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": ""},
            overrides=['models.parrot.provider="parrot"', "api.max_tokens=5"],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(ParrotPlugin(), "parrot-plugin")
    with serve_in_thread(kernel) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


LONG = "one two three four five six seven eight nine ten"


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_an_omitted_max_tokens_is_held_to_api_max_tokens(capped: openai.OpenAI, route: str) -> None:
    """A request that says nothing stops at the limit, with finish_reason
    "length", as one that asked for it would; streamed the same."""
    if route == "chat":
        ask: dict = {"messages": [{"role": "user", "content": LONG}]}
        create = capped.chat.completions.create
        expected = "you said one two three"
    else:
        ask = {"prompt": LONG}
        create = capped.completions.create  # type: ignore[assignment]
        expected = "ten nine eight seven six"
    reply = create(model="parrot", **ask)
    (choice,) = reply.choices
    text = choice.message.content if route == "chat" else choice.text  # type: ignore[union-attr]
    assert text == expected
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5

    events = list(
        create(model="parrot", stream=True, stream_options={"include_usage": True}, **ask)
    )
    pieces = [
        (e.choices[0].delta.content if route == "chat" else e.choices[0].text) or ""
        for e in events
        if e.choices
    ]
    assert "".join(pieces) == expected
    finishes = [e.choices[0].finish_reason for e in events if e.choices]
    assert finishes[-1] == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 5

    # An explicit ask within the limit is the request's; past it, a 400.
    short = create(model="parrot", max_tokens=2, **ask)
    assert short.usage is not None and short.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=6 is over the limit of 5"):
        create(model="parrot", max_tokens=6, **ask)


# --------------------------------------------------------------------------
# Tools with stream: true, streamed as OpenAI streams them
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EventRecorder]]:
    """A daemon serving the caller (the parrot with tools) as ``caller``,
    its monitor events recorded."""
    recorder = EventRecorder()
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(tmp_path_factory.mktemp("tools")), "LLMOS_LOAD_PLUGINS": ""},
            overrides=['models.caller.provider="caller"', "api.max_tokens=64"],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(ParrotPlugin(), "parrot-plugin")
    kernel.plugins.register(recorder, "recorder")
    with serve_in_thread(kernel) as url:
        yield url, recorder


def function(name: str) -> dict:
    parameters = {"type": "object", "properties": {"said": {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [function("get_weather"), function("get_time")]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


def events_of(url: str, body: dict) -> list[dict]:
    """The stream's events as the daemon sends them, ``[DONE]`` last."""
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: "), line
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def calls_of(message) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]


@pytest.mark.parametrize(
    ("choice", "called"),
    [
        ("required", ["get_weather", "get_time"]),
        ("auto", ["get_weather", "get_time"]),
        (NAMED_TIME, ["get_time"]),
    ],
)
def test_a_streamed_tool_call_reassembles_to_the_plain_answer(tools_daemon, choice, called) -> None:
    """The openai client's own stream accumulator (what ``client.chat.
    completions.stream`` uses) rebuilds the calls the plain answer has, with
    finish_reason tool_calls and the usage event last."""
    client = openai.OpenAI(base_url=tools_daemon[0] + "/v1", api_key="unused", max_retries=0)
    ask = {"model": "caller", "messages": [{"role": "user", "content": "paris"}]}
    plain = client.chat.completions.create(**ask, tools=TOOLS, tool_choice=choice)
    assert [name for _, name, _ in calls_of(plain.choices[0].message)] == called
    chunks = list(
        client.chat.completions.create(
            **ask,
            tools=TOOLS,
            tool_choice=choice,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    state: ChatCompletionStreamState = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    (streamed,) = state.get_final_completion().choices
    assert streamed.finish_reason == "tool_calls"
    assert streamed.message.content is None
    assert calls_of(streamed.message) == calls_of(plain.choices[0].message)
    first, *_, finish, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content is None
    assert finish.choices[0].finish_reason == "tool_calls"
    assert last.choices == [] and last.usage == plain.usage


def test_the_events_of_a_streamed_tool_call_are_openais(tools_daemon) -> None:
    """Each call's first delta has its index, id, type, name and empty
    arguments, the next its arguments; then the finish (with the usage, as a
    stream without include_usage has it), then [DONE]."""
    body = {
        "model": "caller",
        "messages": [{"role": "user", "content": "paris"}],
        "tools": TOOLS,
        "stream": True,
    }
    events = events_of(tools_daemon[0], body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    arguments = json.dumps({"said": "paris"})

    def call(i: int, name: str) -> list[dict]:
        head = {"index": i, "id": f"call_{i}_{name}", "type": "function"}
        return [
            {"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]},
            {"tool_calls": [{"index": i, "function": {"arguments": arguments}}]},
        ]

    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": None},
        *call(0, "get_weather"),
        *call(1, "get_time"),
        {},
    ]
    assert [c["choices"][0].get("finish_reason") for c in chunks] == [None] * 5 + ["tool_calls"]
    assert [c.get("usage") for c in chunks[:-1]] == [None] * 5
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}
    # parallel_tool_calls false: one call
    single = events_of(tools_daemon[0], {**body, "parallel_tool_calls": False})
    assert [c["choices"][0]["delta"] for c in single[:-1]] == [
        {"role": "assistant", "content": None},
        *call(0, "get_weather"),
        {},
    ]


def test_a_text_answer_with_tools_streams_as_content(tools_daemon) -> None:
    """With tool_choice auto the model may answer text: content deltas and
    finish_reason stop (or length); with tool_choice none the stream is the
    model's own, token by token, as a stream without tools is."""
    client = openai.OpenAI(base_url=tools_daemon[0] + "/v1", api_key="unused", max_retries=0)

    def streamed(content: str, **options) -> tuple[list[str], str | None, list]:
        chunks = list(
            client.chat.completions.create(
                model="caller",
                messages=[{"role": "user", "content": content}],
                tools=TOOLS,
                stream=True,
                **options,
            )
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        calls = [c for c in chunks if c.choices[0].delta.tool_calls]
        finish = chunks[-1].choices[0].finish_reason
        if finish == "stop":  # the client's accumulator refuses an answer cut short
            state: ChatCompletionStreamState = ChatCompletionStreamState(input_tools=TOOLS)
            for chunk in chunks:
                state.handle_chunk(chunk)
            (rebuilt,) = state.get_final_completion().choices
            assert rebuilt.message.content == "".join(pieces) and not rebuilt.message.tool_calls
        return pieces, finish, calls

    assert streamed("just one two") == (["you said just one two"], "stop", [])
    assert streamed("just one two", max_tokens=2) == (["you said"], "length", [])
    pieces, finish, calls = streamed("one two", tool_choice="none")
    assert pieces == ["you", " said", " one", " two"] and finish == "stop" and not calls


def test_a_streamed_tool_call_is_monitored_as_a_stream(tools_daemon) -> None:
    url, recorder = tools_daemon
    body = {"model": "caller", "messages": [{"role": "user", "content": "monitored"}]}
    events_of(url, {**body, "tools": TOOLS[:1], "tool_choice": "required", "stream": True})
    deadline = time.monotonic() + 5
    while not (seen := [e for e in recorder.of("request") if e.capability == "stream"]):
        assert time.monotonic() < deadline, "no stream event"
        time.sleep(0.02)
    fields = seen[-1].fields
    assert seen[-1].model == "caller" and fields["status"] == "ok"
    assert (fields["tokens_in"], fields["tokens_out"], fields["chunks"]) == (1, 9, 1)
    assert fields["latency_s"] >= fields["ttft_s"] > 0


def test_a_client_that_hangs_up_stops_a_streamed_tool_call(tools_daemon) -> None:
    """The answer comes whole, so nothing is sent for a while after the
    first event: a client that leaves then still stops the model."""
    url, recorder = tools_daemon
    body = {
        "model": "caller",
        "messages": [{"role": "user", "content": "slow paris"}],
        "tools": TOOLS,
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"]
    while "slow paris" not in Caller.abandoned:
        assert time.monotonic() - started < 5, "the model was not stopped"
        time.sleep(0.02)
    while not any(e.fields["status"] == "cancelled" for e in recorder.of("request")):
        assert time.monotonic() - started < 8, "no cancelled event"
        time.sleep(0.02)
