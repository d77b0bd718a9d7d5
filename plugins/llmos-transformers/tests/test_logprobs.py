"""Per-token log-probabilities, echo and token-id prompts (issue 15, item 1).

The provider's figures are checked against a plain forward of the same
weights; then the daemon is driven by the official ``openai`` client, and
by lm-evaluation-harness's ``local-completions`` model running a
loglikelihood task from a local YAML and a local data file, whose answers
must be the ones the provider's own ``score_continuations`` gives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from llmos.config import load_config
from llmos.errors import UsageError
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    LoadedModel,
    Sampling,
)

GREEDY = Sampling(max_tokens=4, temperature=0)


def manual(hf_llama: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward: row ``k`` predicts token ``k + 1``."""
    with torch.no_grad():
        logits = hf_llama(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_logprobs_equal_a_plain_forward(
    llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any
) -> None:
    prompt = "the cat sat on"
    request = CompletionRequest(prompt=prompt, sampling=GREEDY, echo=True, logprobs=3)
    [result] = llama.complete([request])
    [plain] = llama.complete([CompletionRequest(prompt=prompt, sampling=GREEDY)])
    assert result.text == prompt + plain.text  # the echo, then the same answer
    lp = result.logprobs
    assert lp is not None
    prompt_ids = hf_tokenizer(prompt)["input_ids"]
    assert len(lp.tokens) == len(prompt_ids) + plain.usage.completion_tokens
    assert "".join(lp.tokens) == result.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] == ()
    ids = prompt_ids + hf_tokenizer(plain.text, add_special_tokens=False)["input_ids"]
    want = manual(hf_llama, ids)
    for k in range(1, len(ids)):
        assert lp.token_logprobs[k] == pytest.approx(float(want[k - 1, ids[k]]), abs=1e-4)
        top = lp.top_logprobs[k]
        assert len(top) == 3
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        best = torch.topk(want[k - 1], 3)
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # each token's text sits at its offset in the echoed text
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert result.text[offset : offset + len(token)] == token
    # greedy: every generated token is its position's most likely one
    for k in range(len(prompt_ids), len(ids)):
        assert lp.token_logprobs[k] == lp.top_logprobs[k][0][1]


def test_one_greedy_token_comes_from_the_scoring_run(llama: LoadedModel) -> None:
    """What lm-eval sends (echo, logprobs=1, max_tokens=1, greedy) is answered
    from one run of the prompt, without generate: the same token, and the
    same figures as a longer answer's first token."""
    one = Sampling(max_tokens=1, temperature=0)
    prompt = "what is the capital of"
    [fast] = llama.complete([CompletionRequest(prompt=prompt, sampling=one, echo=True, logprobs=1)])
    [plain] = llama.complete([CompletionRequest(prompt=prompt, sampling=one)])
    [longer] = llama.complete(
        [CompletionRequest(prompt=prompt, sampling=GREEDY, echo=True, logprobs=1)]
    )
    assert fast.text == prompt + plain.text and fast.usage == plain.usage
    assert fast.logprobs is not None and longer.logprobs is not None
    n = len(fast.logprobs.tokens)
    assert fast.logprobs.tokens == longer.logprobs.tokens[:n]
    assert fast.logprobs.token_logprobs[1:] == pytest.approx(
        longer.logprobs.token_logprobs[1:n], abs=1e-5
    )


def test_characters_split_over_tokens_are_given_whole() -> None:
    """A byte-level tokenizer that knows every byte but few merges splits
    é, 日 and 🎉 into several tokens: the token that completes a character
    carries it (the others ""), so the tokens join into the text and each
    sits at its offset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmos_transformers import tokens

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["</s>"],
        show_progress=False,
    )
    backend.train_from_iterator(["a cat sat on the mat"] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    text = "un café 日本 🎉 ok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # characters split over tokens
    names = tokens.pieces(tokenizer, ids)
    assert "".join(names) == text and "" in names
    for name, offset in zip(names, tokens.offsets(names, text), strict=True):
        assert text[offset : offset + len(name)] == name
    # the answer's part alone (after a prompt): the same pieces
    assert tokens.pieces(tokenizer, ids, 5) == names[5:]
    # a text cut inside a character: the last token holds what decodes
    cut = tokens.pieces(tokenizer, ids[:-4])
    assert "".join(cut) == tokenizer.decode(ids[:-4])


def test_logprobs_without_echo_cover_the_answer_only(llama: LoadedModel) -> None:
    [result] = llama.complete([CompletionRequest(prompt="a dog ran", sampling=GREEDY, logprobs=0)])
    lp = result.logprobs
    assert lp is not None
    assert len(lp.tokens) == result.usage.completion_tokens == 4
    assert "".join(lp.tokens) == result.text
    assert all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert all(top == () for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_a_token_id_prompt_is_fed_as_it_is(llama: LoadedModel, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("what is the capital")["input_ids"]
    text = CompletionRequest(prompt="what is the capital", sampling=GREEDY, echo=True, logprobs=1)
    tokens = CompletionRequest(prompt="", prompt_ids=ids, sampling=GREEDY, echo=True, logprobs=1)
    by_text, by_ids = llama.complete([text, tokens])
    assert by_ids == by_text
    with pytest.raises(UsageError, match="not in the model's vocabulary") as caught:
        llama.complete([CompletionRequest(prompt="", prompt_ids=[5, 10**6])])
    assert caught.value.param == "prompt"


def test_logprobs_stop_where_a_stop_string_cuts_the_text(llama: LoadedModel) -> None:
    [free] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    stop = free.text[2:4]
    sampling = Sampling(max_tokens=4, temperature=0, stop=(stop,))
    [cut] = llama.complete([CompletionRequest(prompt="the cat", sampling=sampling, logprobs=1)])
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.logprobs is not None
    assert "".join(cut.logprobs.tokens).startswith(cut.text)
    assert all(offset < len(cut.text) for offset in cut.logprobs.text_offset)


def test_chat_logprobs(llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any) -> None:
    messages = (ChatMessage("user", "hello world"),)
    [result] = llama.chat(
        [ChatRequest(messages=messages, sampling=GREEDY, logprobs=True, top_logprobs=2)]
    )
    lp = result.logprobs
    assert lp is not None
    assert "".join(lp.tokens) == result.message.content
    prompt = list(
        hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello world"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    answer = hf_tokenizer(result.message.content, add_special_tokens=False)["input_ids"]
    want = manual(hf_llama, prompt + answer)
    for j, token in enumerate(answer):
        k = len(prompt) + j
        assert lp.token_logprobs[j] == pytest.approx(float(want[k - 1, token]), abs=1e-4)
        assert len(lp.top_logprobs[j]) == 2
    [plain] = llama.chat([ChatRequest(messages=messages, sampling=GREEDY)])
    assert plain.logprobs is None and plain.message == result.message


def test_streams_take_token_ids_but_not_logprobs(llama: LoadedModel, hf_tokenizer: Any) -> None:
    ids = hf_tokenizer("the cat")["input_ids"]
    chunks = list(llama.stream([CompletionRequest(prompt="", prompt_ids=ids, sampling=GREEDY)]))
    [plain] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    assert "".join(c.text for c in chunks) == plain.text
    with pytest.raises(UsageError) as caught:
        list(llama.stream([CompletionRequest(prompt="x", sampling=GREEDY, logprobs=1)]))
    assert caught.value.param == "logprobs"


# --------------------------------------------------------------------------
# The daemon, with the openai client and lm-evaluation-harness
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, llama_dir: Path
) -> Iterator[tuple[str, Kernel]]:
    home = tmp_path_factory.mktemp("home")
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=[
                "plugins.transformers.threads=1",
                f'registry.allowed_roots=["{llama_dir.parent}"]',
                'models.tiny.provider="transformers"',
                f'models.tiny.source="{llama_dir}"',
                "models.tiny.options.max_new_tokens=32",
            ],
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield url, kernel


@pytest.fixture(scope="module")
def client(served: tuple[str, Kernel]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_reads_completion_logprobs(
    client: openai.OpenAI, hf_tokenizer: Any
) -> None:
    reply = client.completions.create(
        model="tiny", prompt="the cat sat", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    [choice] = reply.choices
    lp = choice.logprobs
    assert choice.text.startswith("the cat sat")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    ids = hf_tokenizer("the cat sat")["input_ids"]
    by_ids = client.completions.create(
        model="tiny", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    assert by_ids.choices[0].text == choice.text
    assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs
    # several token-id prompts at once, in order
    several = client.completions.create(
        model="tiny", prompt=[ids, ids[:2]], max_tokens=1, temperature=0, logprobs=1
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 1 for c in several.choices)


def test_the_openai_client_reads_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    [choice] = reply.choices
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": 1, "stream": True}, "logprobs"),
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [5, 10**6]}, "prompt"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprob_requests_are_400s(
    served: tuple[str, Kernel], body: dict[str, Any], param: str
) -> None:
    import httpx

    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(served[0] + path, json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


ITEMS = [
    {"question": "the cat sat on the", "choices": [" mat.", " park!", " monday."], "gold": 0},
    {"question": "a dog ran in the", "choices": [" mat.", " park!", " rug."], "gold": 1},
    {"question": "what is the capital of", "choices": [" france?", " cat", " hello"], "gold": 0},
    {
        "question": "hello world, how are",
        "choices": [" you today?", " the mat.", " paris"],
        "gold": 0,
    },
    {
        "question": "stock markets fell",
        "choices": [" sharply", " kitten", " on the rug."],
        "gold": 0,
    },
    {"question": "a kitten is on", "choices": [" the rug.", " monday.", " france?"], "gold": 0},
]

TASK = """\
task: llmos_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_loglikelihood_task_scores_what_the_provider_scores(
    served: tuple[str, Kernel], llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "llmos_tiny_choice.yaml").write_text(TASK.format(data=data))
    url, kernel = served
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny",
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(llama_dir),
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["llmos_tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    accuracy = results["results"]["llmos_tiny_choice"]["acc,none"]
    samples = sorted(results["samples"]["llmos_tiny_choice"], key=lambda s: s["doc_id"])

    # the provider's own scores of the same continuations, through the kernel
    requests = [
        CompletionRequest(prompt=item["question"], score_continuations=item["choices"])
        for item in ITEMS
    ]
    scored = kernel.call("tiny", Capability.COMPLETE, requests)
    picks = [max(range(3), key=lambda c: r.continuation_logprobs[c]) for r in scored]
    want = sum(p == item["gold"] for p, item in zip(picks, ITEMS, strict=True)) / len(ITEMS)
    assert 0 < want < 1  # the task tells the choices apart, and not trivially
    assert accuracy == want
    for sample, result in zip(samples, scored, strict=True):
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(list(result.continuation_logprobs), abs=1e-3)
    assert not math.isnan(accuracy)


def test_a_token_the_model_rules_out_is_reported_finite(hf_tokenizer: Any) -> None:
    """-inf (a masked logit) is not JSON: it is reported as -9999, as vLLM does."""
    from llmos_transformers import tokens

    ids = hf_tokenizer("the cat")["input_ids"]
    reported = tokens.logprobs(
        hf_tokenizer, ids, 0, [None, -math.inf], [[], [(ids[1], -math.inf)]], "the cat"
    )
    assert reported.token_logprobs == (None, -9999.0)
    assert reported.top_logprobs[1][0][1] == -9999.0
    json.dumps(reported.token_logprobs, allow_nan=False)
