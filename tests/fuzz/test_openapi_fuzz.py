"""Every operation of the daemon's OpenAPI schema, fuzzed over loopback.

schemathesis (pinned in the dev group) reads ``/openapi.json`` from a real
``llmos serve`` (see ``conftest.py``) and, for each operation, sends:

* the schema's examples (``examples`` phase);
* boundary and wrong-typed values for each parameter and body field, one
  at a time (``coverage`` phase: negative cases included);
* ``LLMOS_FUZZ_EXAMPLES`` (default 40) Hypothesis-generated requests,
  valid and invalid (``fuzzing`` phase, generation mode ``all``), where now
  and then a string or a number is one of the values that broke the
  daemon before (``HOSTILE_STRINGS``, ``HOSTILE_INTEGERS``, ``HOSTILE_NUMBERS``).

Each response must pass schemathesis' built-in checks:

* ``not_a_server_error`` — no 5xx, ever;
* ``status_code_conformance`` — the status is one the schema declares;
* ``content_type_conformance`` — the Content-Type is one it declares;
* ``response_schema_conformance`` — the body matches the declared schema;
* ``max_response_time`` — answered within ``TIME_BOUND_S`` (Hypothesis'
  own deadline is off: the bound is on the response, checked here).

The model-taking inference routes get three times the examples and the
bundled models' names half the time, so that generated requests reach
``smollm2`` and ``all-minilm-l6-v2`` (the daemon's ``[api]`` caps keep them
cheap) instead of always stopping at "model not found".

Generation is seeded (``LLMOS_FUZZ_SEED``, default 14): a CI run sends the
same requests each time; set another seed, or more examples, to explore
further locally::

    LLMOS_FUZZ_SEED=7 LLMOS_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest tests/fuzz

A failure's report carries schemathesis' reproduction (a ``curl`` line) and
the daemon's error log lines (a 500's traceback) written while the case ran.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    max_response_time,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("LLMOS_FUZZ_SEED", "14"))
EXAMPLES = int(os.environ.get("LLMOS_FUZZ_EXAMPLES", "40"))
#: the longest any response may take: every model call is capped at a few
#: tokens (conftest's [api] caps), so anything slower is a hang or a bound
#: that does not hold
TIME_BOUND_S = 30.0

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    max_response_time,
]
# A local run may narrow the checks (LLMOS_FUZZ_CHECKS=not_a_server_error): an
# operation's fuzzing stops at its first failure, so a schema violation that
# every case hits hides the 500s behind it.
if os.environ.get("LLMOS_FUZZ_CHECKS"):
    _wanted = set(os.environ["LLMOS_FUZZ_CHECKS"].split(","))
    CHECKS = [check for check in CHECKS if check.__name__ in _wanted]

#: values that random generation rarely reaches and that broke the daemon
#: before (issue 14): a home-relative path, NUL, a boolean query too wide and
#: too deep to parse recursively, a path out of its folder, a long token. (A
#: lone surrogate, another, cannot be here: schemathesis encodes each
#: generated string as UTF-8, which refuses one.)
HOSTILE_STRINGS = [
    "~root/model",
    "~/x",
    "a\x00b",
    " OR ".join(["a"] * 1000),
    "(" * 400 + "a" + ")" * 400,
    "../../../../etc/passwd",
    "x" * 5000,
]
#: past SQLite's and C's 64-bit integers, and the edges of them
HOSTILE_INTEGERS = [2**63, 2**64, -(2**63) - 1, 2**63 - 1, 10**30]

#: floats at the ends of float64 that float32 (a model's sampling) cannot hold
HOSTILE_NUMBERS = [5e-324, 1e-300, 1.7976931348623157e308, -1e-300]

#: JSON body fields that get the hostile values now and then. (schemathesis
#: mixes dictionaries into query and path parameters by type, but into
#: bodies only where a field is named.)
BODY_BINDINGS = {
    **dict.fromkeys(["temperature", "top_p"], "hostile_numbers"),
    **dict.fromkeys(
        ["seed", "parameters", "version", "dimensions", "max_tokens"], "hostile_integers"
    ),
    **dict.fromkeys(
        [
            "source",
            "path",
            "model_url",
            "data.train",
            "dev",
            "prompt",
            "input",
            "texts[*]",
            "labels[*]",
            "messages[*].content",
            "stop",
        ],
        "hostile_strings",
    ),
}

#: the routes whose ``model`` names a model to run
INFERENCE = r"^/(v1/chat/completions|v1/completions|v1/embeddings|api/classify)$"


def _config() -> schemathesis.Config:
    no_response_values = {"responses": False}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # no .schemathesis/ folder (it would replay old crashes first)
            "cache": {"enabled": False},
            # Hypothesis' health checks time data generation, which a busy
            # 2-core machine slows; the requests are what is under test
            "suppress-health-check": ["all"],
            # no .hypothesis/ folder: every run starts from the seed alone
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                "database": "none",
                # a shrinking failure repeats its call many times; the
                # reproduction is printed unshrunk, which bounds the run
                "no-shrink": True,
                # now and then, any string or integer is one known to have broken
                # a parser, a path check or a database bind (issue 14's 500s)
                "dictionaries": {
                    "string": {"dictionary": "hostile_strings", "probability": 0.1},
                    "integer": {"dictionary": "hostile_integers", "probability": 0.2},
                    "number": {"dictionary": "hostile_numbers", "probability": 0.1},
                },
            },
            "phases": {
                "examples": {"enabled": True, "extra-data-sources": no_response_values},
                # names seen in responses are not reused as inputs: a DELETE
                # fed "smollm2" would remove the bundled model mid-run
                "coverage": {"enabled": True, "extra-data-sources": no_response_values},
                "fuzzing": {"enabled": True, "extra-data-sources": no_response_values},
                # off: the schema declares no links, and inferred sequences
                # (register, then tag, then delete...) would cost minutes
                "stateful": {"enabled": False},
            },
            "checks": {"max_response_time": TIME_BOUND_S},
            # reproductions as sent: by default schemathesis masks values of
            # keys that look secret, and "max_tokens" looks like one
            "output": {"sanitization": {"enabled": False}},
            # a hung request fails the case (as over its time bound) instead of the run
            "request-timeout": TIME_BOUND_S + 10,
            "max-stream-events": 16,
            "dictionaries": {
                "models": {"values": ["smollm2", "all-minilm-l6-v2"]},
                "hostile_strings": {"values": HOSTILE_STRINGS},
                "hostile_integers": {"values": HOSTILE_INTEGERS},
                "hostile_numbers": {"values": HOSTILE_NUMBERS},
            },
            "parameters": {
                f"body.{field}": {"dictionary": dictionary, "probability": 0.2}
                for field, dictionary in BODY_BINDINGS.items()
            },
            # No operation is left out. The ones that might look unfuzzable are
            # bounded: an event stream (GET .../events) is read for at most
            # max-stream-events events and only a job that exists streams (no
            # generated id does); an artifact upload (PUT .../artifact) is
            # bounded by [server] max_body_bytes; POST /microtune waits only for
            # a job it could submit, which needs a registered base model and
            # valid rows; nothing in the API stops the daemon.
            "operations": [
                {
                    "include-path-regex": INFERENCE,
                    "parameters": {"body.model": {"dictionary": "models", "probability": 0.5}},
                    # the routes that run models get more: half reach one, and
                    # a model's sampling is where hostile numbers end up
                    "generation": {"max-examples": 3 * EXAMPLES},
                }
            ],
        }
    )


@pytest.fixture(scope="session")
def api_schema(tally: Any) -> Any:
    return schemathesis.openapi.from_url(f"{tally.url}/openapi.json", config=_config())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_the_daemon_answers_every_generated_request_within_its_schema(
    case: Any, tally: Any
) -> None:
    offset = tally.log_size()
    try:
        response = case.call()
        tally.statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as exc:
        errors = tally.errors_since(offset)
        if not errors:
            raise
        # schemathesis' report (with the curl line) and why the daemon failed
        # (a note would be dropped: schemathesis' pytest plugin clears them)
        raise AssertionError(
            f"{exc}\n\nThe daemon's error log during this case:\n\n" + "\n\n".join(errors[-3:])
        ) from None
