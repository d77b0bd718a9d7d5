"""Requests into token ids, token ids into answer text: one implementation
for every provider that serves a Hugging Face tokenizer (this one, and
llmos-vllm), so that a request makes the same prompt tokens, and the same
tokens make the same text, stops and stream chunks, whichever serves it.

Nothing here imports torch: only the tokenizer is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llmos.errors import UsageError
from llmos.types import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    Logprobs,
    Sampling,
    Tool,
    Usage,
)
from llmos_transformers.structured import tools_prompt

__all__ = [
    "TextStream",
    "answer",
    "chat_ids",
    "chat_result",
    "check_ids",
    "check_scored",
    "completion_result",
    "continuation_ids",
    "decode",
    "encode",
    "generates",
    "held_back",
    "kept",
    "logprobs",
    "offsets",
    "piece",
    "pieces",
    "prompt_ids",
    "room",
    "samples",
    "stop_at",
    "takes_tools",
    "zero_shot",
    "zero_shot_results",
]


def encode(tokenizer: Any, text: str) -> list[int]:
    """A prompt's ids (with the tokenizer's special tokens); an empty prompt
    is the beginning-of-sequence token alone."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids:
        if tokenizer.bos_token_id is None:
            raise UsageError("the prompt is empty", param="prompt")
        ids = [tokenizer.bos_token_id]
    return ids


def check_ids(ids: Sequence[int], vocab: int) -> list[int]:
    """A token-id prompt, checked: not empty, every id in the tokenizer's
    ``vocab`` (an id past it would fail deep in the model)."""
    if not ids:
        raise UsageError("the prompt has no token ids", param="prompt")
    for i, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise UsageError(
                f"token id {token} (item {i} of the prompt) is not in the model's"
                f" vocabulary of {vocab} tokens",
                param="prompt",
            )
    return list(ids)


def prompt_ids(tokenizer: Any, request: CompletionRequest) -> list[int]:
    """A completion's prompt ids: its token ids as they are, else its text encoded."""
    if request.prompt_ids is not None:
        return check_ids(request.prompt_ids, len(tokenizer))
    return encode(tokenizer, request.prompt)


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """A continuation's ids: no special tokens, it follows a prompt."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` (and tool
    calls, and tool messages) itself, as Qwen's, Llama 3's or Hermes' do."""
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _conversation(
    messages: Sequence[ChatMessage], native: bool, system: str
) -> list[dict[str, Any]]:
    """The messages as a chat template reads them. ``native``: the template
    renders tool calls and tool messages; else an assistant's calls are its
    text, as the tools prompt asks for them, and a tool's answer is a user
    message quoting it. ``system`` is added to the system prompt (the first
    message, made when there is none)."""
    conversation: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls and native:
            turn["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c.arguments)},
                }
                for c in m.tool_calls
            ]
        elif m.tool_calls:
            calls = [{"name": c.name, "arguments": _arguments(c.arguments)} for c in m.tool_calls]
            text = json.dumps(calls[0] if len(calls) == 1 else calls)
            turn["content"] = f"{m.content}\n{text}" if m.content else text
        if m.role == "tool" and native:
            turn["tool_call_id"] = m.tool_call_id
        elif m.role == "tool":
            turn = {"role": "user", "content": f"The function returned: {m.content}"}
        conversation.append(turn)
    if system:
        if conversation and conversation[0]["role"] == "system":
            first = conversation[0]
            conversation[0] = {**first, "content": f"{first['content']}\n\n{system}"}
        else:
            conversation.insert(0, {"role": "system", "content": system})
    return conversation


def chat_ids(
    tokenizer: Any,
    model: str,
    messages: Sequence[ChatMessage],
    tools: Sequence[Tool] = (),
    system: str = "",
) -> list[int]:
    """A chat's ids through the tokenizer's chat template, ending with the
    assistant's turn; ``model`` names the model in errors. ``tools`` go to a
    template that takes them (:func:`takes_tools`), else into the system
    prompt (:func:`llmos_transformers.structured.tools_prompt`); ``system``
    is more to say there (what JSON the answer must be)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"model {model!r} has no chat template in its tokenizer, so it cannot"
            " chat; use completions, or serve a chat-tuned model",
            param="messages",
        )
    if not messages:
        raise UsageError("a chat needs at least one message", param="messages")
    native = takes_tools(tokenizer)
    options: dict[str, Any] = {}
    if tools and native:
        options["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": dict(t.parameters),
                },
            }
            for t in tools
        ]
    elif tools:
        system = "\n\n".join(s for s in (tools_prompt(tools), system) if s)
    conversation = _conversation(messages, native, system)
    try:
        encoded = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, **options
        )
    except Exception as exc:  # jinja2 errors: a role the template refuses, say
        raise UsageError(
            f"model {model!r}: the chat template refused these messages:"
            f" {type(exc).__name__}: {exc}",
            param="messages",
        ) from exc
    return list(encoded["input_ids"])


def room(model: str, ids: Sequence[int], context: int) -> int:
    """Tokens a ``context`` of that many leaves after the prompt ``ids``;
    a prompt that leaves none is refused."""
    left = context - len(ids)
    if left < 1:
        raise UsageError(
            f"the prompt is {len(ids)} tokens; model {model!r} takes at most"
            f" {context} tokens in all",
            param="prompt",
        )
    return left


def generation_limit(
    model: str, ids: Sequence[int], sampling: Sampling, cap: int, context: int | None
) -> int:
    """Tokens a request may generate: its ``max_tokens``, within the
    provider's ``cap`` and the room a ``context`` (``None``: unknown) leaves
    after the prompt ``ids``; a prompt that leaves none is refused."""
    limit = min(sampling.max_tokens or cap, cap)
    return limit if context is None else min(limit, room(model, ids, context))


def check_streamable(request: CompletionRequest | ChatRequest) -> None:
    """Refuse a stream whose chat may call tools: tool calls are parsed from the
    whole answer, so the kernel answers such a stream with ``chat`` (one chunk);
    only a caller of the provider's ``stream`` itself gets here."""
    if isinstance(request, ChatRequest) and request.may_call_tools:
        raise UsageError(
            "a chat that may call tools is answered whole, not streamed token by token:"
            ' call chat (the kernel does so for a streamed request), or send tool_choice "none"',
            param="stream",
        )


def check_scored(model: str, what: str, prompt: int, continuation: int, context: int) -> None:
    """Refuse scoring a continuation of ``continuation`` tokens after a prompt
    of ``prompt`` that together do not fit a ``context`` of that many tokens
    (the model would read positions it was never trained on); ``what`` names
    the continuation."""
    if prompt + continuation > context:
        raise UsageError(
            f"{what}: the prompt ({prompt} tokens) and the continuation ({continuation}"
            f" tokens) are {prompt + continuation} tokens; model {model!r} takes at most"
            f" {context} tokens in all: shorten the text",
            param="prompt",
        )


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ids, special tokens left out."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, or ``None``."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` a stream must not send yet:
    an unfinished UTF-8 sequence, or the start of a stop string."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    if text.endswith("\ufffd"):
        keep = max(keep, len(text) - len(text.rstrip("\ufffd")))
    return keep


def answer(
    tokenizer: Any, ids: list[int], stops: Sequence[str], eos: frozenset[int]
) -> tuple[str, str]:
    """The text of a request's generated ``ids``, cut before its first stop
    string, and why it ended: ``stop`` (a stop string or an end-of-sequence
    token) or ``length``."""
    text = decode(tokenizer, ids)
    cut = stop_at(text, stops)
    if cut is not None:
        return text[:cut], "stop"
    return text, "stop" if ids and ids[-1] in eos else "length"


class TextStream:
    """A stream's text as its tokens come: :meth:`push` gives what may be
    sent now — the text so far, less an unfinished character or the start of
    a stop string, and never anything past a stop string — and :meth:`rest`
    what is left of the final answer, so the chunks concatenate to it."""

    def __init__(self, decode_ids: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode = decode_ids
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: Iterable[int]) -> str:
        self.tokens.extend(tokens)
        text = self.decode(self.tokens)
        cut = stop_at(text, self.stops)
        ready = text[:cut] if cut is not None else text[: len(text) - held_back(text, self.stops)]
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            delta, self.sent = ready[len(self.sent) :], ready
            return delta
        return ""

    def rest(self, final: str) -> str | None:
        """What is left to send of ``final``; ``None`` when the text sent is
        not its start (a decoder that rewrote earlier text)."""
        return final[len(self.sent) :] if final.startswith(self.sent) else None


#: temperatures below this sample greedily, as vLLM does: in float32 (the
#: logits' type) 1e-300 is 0, and dividing by it gives inf/NaN probabilities
GREEDY_BELOW = 1e-5


def samples(sampling: Sampling) -> bool:
    """Whether a request samples (else it is greedy): a temperature is given
    and is not too small to divide the logits by."""
    return sampling.temperature is not None and sampling.temperature >= GREEDY_BELOW


def generates(request: CompletionRequest) -> bool:
    """Whether a completion request wants text: a request that scores
    continuations generates only when it sets ``sampling.max_tokens``."""
    return not request.score_continuations or request.sampling.max_tokens is not None


def completion_result(
    answer: Any | None, prompt_tokens: int, scores: Sequence[float]
) -> CompletionResult:
    """A completion's result from its generated ``answer`` (``text``,
    ``finish_reason``, ``usage``) and its continuations' ``scores``; ``None``:
    the request was only scored."""
    if answer is None:
        usage = Usage(prompt_tokens=prompt_tokens)
        return CompletionResult(text="", usage=usage, continuation_logprobs=tuple(scores))
    return CompletionResult(
        text=answer.text,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        continuation_logprobs=tuple(scores),
    )


def chat_result(answer: Any, logprobs: Logprobs | None = None) -> ChatResult:
    """A chat's result from its generated ``answer``."""
    return ChatResult(
        message=ChatMessage("assistant", answer.text),
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        logprobs=logprobs,
    )


#: tokens of context a token's text is decoded in (see :func:`piece`)
_WINDOW = 4
#: the log-probability reported for a token the model rules out (-inf, which
#: JSON cannot carry), as vLLM and OpenAI report it
LOWEST_LOGPROB = -9999.0


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=False))


def piece(tokenizer: Any, before: Sequence[int], token: int) -> str:
    """The text ``token`` adds after the tokens ``before``, decoded in a few
    tokens of context (a token decoded alone may lose a leading space, as
    SentencePiece's do): how an alternative at a position is named."""
    context = list(before[-_WINDOW:])
    head = _text(tokenizer, context)
    full = _text(tokenizer, [*context, token])
    if full.startswith(head):
        return full[len(head) :]
    same = 0  # a character completed by this token: what changed
    while same < min(len(head), len(full)) and head[same] == full[same]:
        same += 1
    return full[same:]


def pieces(tokenizer: Any, ids: Sequence[int], start: int = 0) -> list[str]:
    """The text each of ``ids[start:]`` adds, in context, such that they
    join into the text of those ids. A token that ends inside a character
    (byte-level tokenizers split UTF-8 sequences) adds ``""``, and the token
    that completes the character adds all of it. Special tokens keep their
    text (``</s>``). Decoded incrementally, a few tokens of context at a
    time, as streaming detokenizers do."""
    out: list[str] = []
    prefix, read = max(start - _WINDOW, 0), start
    for k in range(start, len(ids)):
        head = _text(tokenizer, ids[prefix:read])
        full = _text(tokenizer, ids[prefix : k + 1])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            same = len(head)
            if not full.startswith(head):  # a decoder that rewrote the context: what changed
                same = 0
                while same < len(head) and head[same] == full[same]:
                    same += 1
            out.append(full[same:])
            prefix, read = read, k + 1
        else:
            out.append("")
    if read < len(ids):  # a text that ends inside a character: the last token has the rest
        head = _text(tokenizer, ids[prefix:read])
        full = _text(tokenizer, ids[prefix:])
        out[-1] = full[len(head) :] if full.startswith(head) else full
    return out


def kept(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """The generated ``ids`` an answer's ``text`` is made of: all of them,
    unless the text was cut at a stop string, then those that start before
    the cut."""
    if decode(tokenizer, list(ids)) == text:
        return list(ids)
    out: list[int] = []
    at = 0
    for token, name in zip(ids, pieces(tokenizer, ids), strict=True):
        if at >= len(text):
            break
        out.append(token)
        at += len(name)
    return out


def offsets(names: Sequence[str], text: str) -> list[int]:
    """Where each token's text starts in ``text``: one after the other; a
    token whose text is not there (a special token the tokenizer added, a
    leading space the decoder dropped) takes what of it is there, or no
    room."""
    out = []
    at = 0
    for name in names:
        out.append(at)
        if text.startswith(name, at):
            at += len(name)
        elif name.strip() and text.startswith(name.lstrip(), at):
            at += len(name.lstrip())
    return out


def logprobs(
    tokenizer: Any,
    ids: Sequence[int],
    first: int,
    chosen: Sequence[float | None],
    tops: Sequence[Sequence[tuple[int, float]]],
    text: str,
) -> Logprobs:
    """The :class:`Logprobs` of ``ids[first:]``: ``chosen[i]`` is the
    log-probability of ``ids[first + i]`` (``None`` for a prompt's first
    token) and ``tops[i]`` the most likely ``(id, logprob)`` at its position;
    offsets point into ``text`` (the answer, with the prompt first when
    echoed)."""
    names = pieces(tokenizer, ids, first)
    top_names = [
        [(piece(tokenizer, ids[:i], t), max(lp, LOWEST_LOGPROB)) for t, lp in tops[i - first]]
        for i in range(first, len(ids))
    ]
    return Logprobs(
        tokens=names,
        token_logprobs=[None if lp is None else max(lp, LOWEST_LOGPROB) for lp in chosen],
        top_logprobs=top_names,
        text_offset=offsets(names, text),
    )


def zero_shot(
    tokenizer: Any, model: str, template: str, requests: Sequence[ClassifyRequest]
) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """Zero-shot classification as scoring: each request's prompt (``template``
    with its text), and the (prompt, label) pairs whose label log-likelihood
    decides it, request by request, label by label."""
    prompts: list[list[int]] = []
    pairs: list[tuple[list[int], list[int]]] = []
    for request in requests:
        if not request.labels:
            raise UsageError(
                f"model {model!r} is a language model with no labels of its own;"
                " give the labels to choose from",
                param="labels",
            )
        prompt = encode(tokenizer, template.replace("{text}", request.text))
        prompts.append(prompt)
        pairs.extend((prompt, continuation_ids(tokenizer, label)) for label in request.labels)
    return prompts, pairs


def zero_shot_results(
    requests: Sequence[ClassifyRequest], prompts: Sequence[list[int]], scores: Iterable[float]
) -> list[ClassifyResult]:
    """The labels' probabilities: the softmax of their scores (in
    :func:`zero_shot`'s order)."""
    scores = iter(scores)
    results = []
    for request, prompt in zip(requests, prompts, strict=True):
        logprobs = [next(scores) for _ in request.labels]
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        results.append(
            ClassifyResult(
                scores={label: w / total for label, w in zip(request.labels, weights, strict=True)},
                usage=Usage(prompt_tokens=len(prompt)),
            )
        )
    return results
