"""The OpenAI-compatible API, driven by the official ``openai`` client.

The model is a small deterministic provider registered in-process, so every
answer can be checked exactly; the real-model end-to-end tests live with the
transformers plugin. Everything between the client and the model is real: the
daemon on loopback, middleware, kernel resolution, batching and events.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest

from llmos.config import load_config
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import (
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
    Usage,
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

    def _answer(self, request: CompletionRequest | ChatRequest) -> tuple[str, str, Usage]:
        if isinstance(request, ChatRequest):
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
        return [
            EmbedResult(vector=vector_of(r.text), usage=Usage(prompt_tokens=1)) for r in requests
        ]

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        out = []
        for r in requests:
            good = 0.9 if "good" in r.text else 0.2
            out.append(ClassifyResult(scores={"positive": good, "negative": 1 - good}))
        return out


class ParrotPlugin:
    @hookimpl
    def llmos_register_providers(self, register):
        register(ProviderSpec(name="parrot", load=lambda request: Parrot(request.card)))


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
    assert refused.json()["error"]["type"] == "overloaded"


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
