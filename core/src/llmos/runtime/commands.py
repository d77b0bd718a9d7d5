"""``llmos chat | complete | embed | classify``: use a model from the terminal.

Each command runs against a daemon (``--url``, or ``$LLMOS_URL``) through its
OpenAI-compatible API, or, without one, in this process through a kernel of
its own. The two paths give the same answers: the daemon runs the same kernel.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import click

from llmos.errors import LlmosError, NotFoundError, UsageError
from llmos.output import json_option
from llmos.runtime.kernel import Kernel
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbedRequest,
    Sampling,
)

KernelGetter = Callable[[click.Context], Kernel]


class Backend(Protocol):
    def chat(
        self, model: str, messages: list[ChatMessage], sampling: Sampling
    ) -> Iterator[str]: ...

    def complete(self, model: str, prompts: Sequence[str], sampling: Sampling) -> list[dict]: ...

    def embed(self, model: str, texts: Sequence[str]) -> list[list[float]]: ...

    def classify(self, model: str, texts: Sequence[str], labels: Sequence[str]) -> list[dict]: ...

    def close(self) -> None: ...


class LocalBackend:
    """A kernel in this process (started on first use, stopped on close)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        kernel.start()

    def chat(self, model: str, messages: list[ChatMessage], sampling: Sampling) -> Iterator[str]:
        handle = self.kernel.stream(model, ChatRequest(messages=messages, sampling=sampling))
        try:
            for chunk in handle:
                yield chunk.text
        finally:
            handle.cancel()

    def complete(self, model: str, prompts: Sequence[str], sampling: Sampling) -> list[dict]:
        requests = [CompletionRequest(prompt=p, sampling=sampling) for p in prompts]
        results = self.kernel.call(model, Capability.COMPLETE, requests)
        return [{"text": r.text, "finish_reason": r.finish_reason} for r in results]

    def embed(self, model: str, texts: Sequence[str]) -> list[list[float]]:
        results = self.kernel.call(model, Capability.EMBED, [EmbedRequest(text=t) for t in texts])
        return [list(r.vector) for r in results]

    def classify(self, model: str, texts: Sequence[str], labels: Sequence[str]) -> list[dict]:
        requests = [ClassifyRequest(text=t, labels=tuple(labels)) for t in texts]
        results = self.kernel.call(model, Capability.CLASSIFY, requests)
        # the daemon's shape: a fusion's accounting under "llmos"
        return [
            {
                "label": r.label,
                "scores": dict(r.scores),
                **({"llmos": {"meta": dict(r.meta)}} if r.meta else {}),
            }
            for r in results
        ]

    def close(self) -> None:
        self.kernel.stop()


class HttpBackend:
    """A running daemon, through its OpenAI-compatible API."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)

    def _unreachable(self, exc: Exception) -> LlmosError:
        return LlmosError(
            f"cannot reach the daemon at {self.client.base_url} ({exc}); "
            "start it with `llmos serve`, or drop --url to run in this process"
        )

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """``GET path`` on the daemon; its JSON, or the daemon's error."""
        import httpx

        try:
            response = self.client.get(path, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response.json()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        import httpx

        try:
            response = self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response.json()

    def chat(self, model: str, messages: list[ChatMessage], sampling: Sampling) -> Iterator[str]:
        body = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            **_sampling_body(sampling),
        }
        import httpx

        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0].get("delta", {})
                    if delta.get("content"):
                        yield delta["content"]
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def complete(self, model: str, prompts: Sequence[str], sampling: Sampling) -> list[dict]:
        body = {"model": model, "prompt": list(prompts), **_sampling_body(sampling)}
        choices = self._post("/v1/completions", body)["choices"]
        return [{"text": c["text"], "finish_reason": c["finish_reason"]} for c in choices]

    def embed(self, model: str, texts: Sequence[str]) -> list[list[float]]:
        data = self._post("/v1/embeddings", {"model": model, "input": list(texts)})["data"]
        return [item["embedding"] for item in data]

    def classify(self, model: str, texts: Sequence[str], labels: Sequence[str]) -> list[dict]:
        body = {"model": model, "texts": list(texts), "labels": list(labels)}
        return self._post("/api/classify", body)["results"]

    def close(self) -> None:
        self.client.close()


def _raise_for(response: Any) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    cls = NotFoundError if response.status_code == 404 else LlmosError
    raise cls(f"the daemon answered {response.status_code}: {message}")


def _sampling_body(sampling: Sampling) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return {k: v for k, v in body.items() if v is not None}


def _texts(args: Sequence[str]) -> list[str]:
    """Texts from the arguments, or one a line from stdin when there are none."""
    texts = list(args) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UsageError("give the text as arguments, or one a line on standard input")
    return texts


def connection(
    f: Callable[..., Any], *, local: str = "run the model in this process"
) -> Callable[..., Any]:
    """The ``--url`` and ``--api-key-env`` options of a command that can work
    against a daemon or locally (``local`` says what it does without one)."""
    f = click.option(
        "--url",
        envvar="LLMOS_URL",
        help=f"A running daemon (default: $LLMOS_URL; none: {local}).",
    )(f)
    return click.option(
        "--api-key-env",
        default="LLMOS_API_KEY",
        show_default=True,
        help="Environment variable with the daemon's API key.",
    )(f)


def backend(
    ctx: click.Context, get_kernel: KernelGetter, url: str | None, api_key_env: str
) -> Backend:
    """The daemon at ``url`` when given, else a kernel in this process."""
    if url:
        return HttpBackend(url, os.environ.get(api_key_env))
    return LocalBackend(get_kernel(ctx))


def inference_commands(get_kernel: KernelGetter) -> list[click.Command]:
    """The four commands, over the kernel the CLI's root options describe."""

    def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in (
            click.option(
                "--max-tokens", type=click.IntRange(min=1), help="Most tokens to generate."
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(0, 2),
                help="0 (the default): greedy. The HTTP API's default is OpenAI's, 1.",
            ),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True)),
            click.option("--seed", type=int, help="Same seed, same sample."),
            click.option("--stop", multiple=True, help="Stop at this text (repeat)."),
        ):
            f = option(f)
        return f

    def sampling_of(kw: dict[str, Any]) -> Sampling:
        # Greedy unless asked, in this process as against a daemon (whose
        # HTTP default is OpenAI's temperature 1): the same command, the same answer.
        temperature = kw.pop("temperature")
        return Sampling(
            max_tokens=kw.pop("max_tokens"),
            temperature=0.0 if temperature is None else temperature,
            top_p=kw.pop("top_p"),
            seed=kw.pop("seed"),
            stop=tuple(kw.pop("stop")),
        )

    @click.command("chat")
    @click.argument("model")
    @click.argument("prompt", required=False)
    @click.option("--system", help="A system message.")
    @sampling_options
    @connection
    @click.pass_context
    def chat(
        ctx: click.Context,
        model: str,
        prompt: str | None,
        system: str | None,
        url: str | None,
        api_key_env: str,
        **kw: Any,
    ) -> None:
        """Chat with MODEL: answer PROMPT, or talk interactively without one."""
        sampling = sampling_of(kw)
        client = backend(ctx, get_kernel, url, api_key_env)
        history = [ChatMessage("system", system)] if system else []
        try:
            if prompt is not None:
                history.append(ChatMessage("user", prompt))
                _print_stream(client.chat(model, history, sampling))
                return
            click.echo(f"chatting with {model}; an empty line or Ctrl-D ends", err=True)
            while True:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    click.echo(err=True)
                    return
                if not line.strip():
                    return
                history.append(ChatMessage("user", line))
                reply = _print_stream(client.chat(model, history, sampling))
                history.append(ChatMessage("assistant", reply))
        finally:
            client.close()

    @click.command("complete")
    @click.argument("model")
    @click.argument("prompts", nargs=-1)
    @sampling_options
    @connection
    @json_option
    @click.pass_context
    def complete(
        ctx: click.Context,
        model: str,
        prompts: tuple[str, ...],
        url: str | None,
        api_key_env: str,
        as_json: bool,
        **kw: Any,
    ) -> None:
        """Continue each PROMPT (or each line of standard input) with MODEL."""
        sampling = sampling_of(kw)
        client = backend(ctx, get_kernel, url, api_key_env)
        try:
            results = client.complete(model, _texts(prompts), sampling)
        finally:
            client.close()
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            for result in results:
                click.echo(result["text"])

    @click.command("embed")
    @click.argument("model")
    @click.argument("texts", nargs=-1)
    @connection
    @click.pass_context
    def embed(
        ctx: click.Context, model: str, texts: tuple[str, ...], url: str | None, api_key_env: str
    ) -> None:
        """Embed each TEXT (or each line of standard input): one JSON array a line."""
        client = backend(ctx, get_kernel, url, api_key_env)
        try:
            vectors = client.embed(model, _texts(texts))
        finally:
            client.close()
        for vector in vectors:
            click.echo(json.dumps([round(v, 6) for v in vector]))

    @click.command("classify")
    @click.argument("model")
    @click.argument("texts", nargs=-1)
    @click.option(
        "--label", "labels", multiple=True, help="Zero-shot label (repeat); none: the model's own."
    )
    @connection
    @json_option
    @click.pass_context
    def classify(
        ctx: click.Context,
        model: str,
        texts: tuple[str, ...],
        labels: tuple[str, ...],
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Label each TEXT (or each line of standard input) with MODEL."""
        client = backend(ctx, get_kernel, url, api_key_env)
        items = _texts(texts)
        try:
            results = client.classify(model, items, labels)
        finally:
            client.close()
        if as_json:
            click.echo(json.dumps(results, indent=2))
            return
        for text, result in zip(items, results, strict=True):
            score = result["scores"][result["label"]]
            click.echo(f"{result['label']}\t{score:.3f}\t{text}")

    return [chat, complete, embed, classify]


def _print_stream(pieces: Iterator[str]) -> str:
    """Write the pieces as they come; return the whole text."""
    out = []
    for piece in pieces:
        out.append(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    return "".join(out)
