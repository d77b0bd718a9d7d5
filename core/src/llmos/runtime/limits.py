"""The ``[api]`` config section: caps on what one request may ask for.

The daemon's OpenAI-compatible routes enforce them
(:mod:`llmos.server.openai_api`). The section is registered here, where the
kernel imports it before any config is loaded, so that registering it does
not import FastAPI.

One request's inputs (embeddings, completions times ``n``, classify texts, chat
choices) all wait together in the queue of the model that serves it, so
``max_inputs`` and ``max_n`` are capped by ``[runtime] max_queue``
(:func:`queued_cap`); their defaults fit its default.
"""

from __future__ import annotations

from llmos.config import Config, Field, Section

#: the [api] config section (the kernel passes it to load_config)
SECTION = Section(
    "api",
    {
        "max_tokens": Field(
            "int",
            4096,
            "Largest max_tokens a request may ask for, and the max_tokens of one that asks"
            " for none (it stops there, finish_reason length).",
            min=1,
        ),
        "max_n": Field(
            "int",
            8,
            "Most choices (n) per request; [runtime] max_queue if that is smaller.",
            min=1,
        ),
        "max_prompt_chars": Field(
            "int",
            200_000,
            "Longest prompt, message, input, label or stop text, in characters.",
            min=1,
        ),
        "max_inputs": Field(
            "int",
            64,
            "Most inputs in one embeddings, completions (prompts times n) or classify request;"
            " [runtime] max_queue if that is smaller: they all wait in a model's queue.",
            min=1,
        ),
    },
    doc="Caps on the OpenAI-compatible API's requests.",
)


def queued_cap(config: Config, key: str, default: int) -> tuple[int, str]:
    """``[api] key`` as the daemon enforces it, and the setting that decides it.

    A request's inputs all wait together in one model's queue, so a request
    larger than ``[runtime] max_queue`` (every model's default queue) could
    never be queued: there the queue is the cap, and the 400 names it. A
    deployment that sets a smaller ``max_queue`` of its own refuses larger
    requests with a 400 naming that ``max_queue``.
    """
    value = int(config.section("api").get(key, default))
    queue = int(config.section("runtime").get("max_queue", 64))
    if queue < value:
        return queue, f"[runtime] max_queue, below api.{key} = {value}"
    return value, f"api.{key}"
