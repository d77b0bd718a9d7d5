"""The ``[api]`` config section: caps on what one request may ask for.

The daemon's OpenAI-compatible routes enforce them
(:mod:`llmos.server.openai_api`). The section is registered here, where the
kernel imports it before any config is loaded, so that registering it does
not import FastAPI.
"""

from __future__ import annotations

from llmos.config import Field, register_section

register_section(
    "api",
    {
        "max_tokens": Field(
            "int", 4096, "Largest max_tokens a request may ask for.", check=lambda n: n >= 1
        ),
        "max_n": Field("int", 8, "Most choices (n) per request.", check=lambda n: n >= 1),
        "max_prompt_chars": Field(
            "int", 200_000, "Longest prompt or message text, in characters.", check=lambda n: n > 0
        ),
        "max_inputs": Field(
            "int",
            256,
            "Most inputs in one embeddings, completions or classify request.",
            check=lambda n: n >= 1,
        ),
    },
    doc="Caps on the OpenAI-compatible API's requests.",
)
