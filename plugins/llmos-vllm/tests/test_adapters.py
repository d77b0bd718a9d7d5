"""LoRA adapters tuned by llmos-peft, served per request in the base's
engine: token for token what the transformers provider serves, several in
one batch with the base, loaded without a restart."""

from __future__ import annotations

import threading

import pytest

from llmos.errors import NotFoundError
from llmos.runtime.kernel import Kernel
from llmos.types import Capability, ChatRequest, CompletionRequest, Sampling
from llmos_vllm import engine as engines

GREEDY = Sampling(temperature=0, max_tokens=16)
QUESTIONS = ["greet kim", "greet lea", "greet anna"]


def chat(kernel: Kernel, model: str, question: str) -> str:
    request = ChatRequest(messages=[{"role": "user", "content": question}], sampling=GREEDY)
    return kernel.call(model, Capability.CHAT, [request])[0].message.content


def test_an_adapter_answers_as_the_transformers_provider_serves_it(kernel: Kernel) -> None:
    for question in QUESTIONS:
        ours = chat(kernel, "lora-a", question)
        assert ours == chat(kernel, "lora-a-hf", question)
        assert ours != chat(kernel, "tiny", question)  # the adapter is applied
    # each learnt the start of its answer
    assert chat(kernel, "lora-a", "greet kim").startswith("hello")
    assert chat(kernel, "lora-b", "greet kim").startswith("bye")


def test_an_adapters_tokens_are_transformers_tokens(kernel: Kernel) -> None:
    """Token ids against ``generate`` of the transformers provider's own
    model for the adapter (LoRA merged into the base)."""
    import torch

    served = kernel.models.get("lora-a").model
    reference = kernel.models.get("lora-a-hf").model  # llmos-transformers' CausalLM
    requests = [CompletionRequest(prompt=q, sampling=GREEDY) for q in QUESTIONS]
    for request, ours in zip(requests, served.generate(requests), strict=True):
        ids = reference.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = reference.model.generate(ids, max_new_tokens=16, do_sample=False)
        assert list(ours.token_ids) == out[0, ids.shape[1] :].tolist()


def test_adapters_and_their_base_share_one_engine_and_one_batch(kernel: Kernel) -> None:
    """The base and two adapters asked at once, from twelve callers: one
    engine, every answer the one each model gives alone."""
    models = ["tiny", "lora-a", "lora-b"]
    alone = {(m, q): chat(kernel, m, q) for m in models for q in QUESTIONS}
    assert len({alone[m, "greet kim"] for m in models}) == 3  # three different models
    started = len(kernel.recorder.of("engine.started"))
    got: dict[tuple[str, str], list[str]] = {}

    def call(model: str, question: str) -> None:
        got.setdefault((model, question), []).append(chat(kernel, model, question))

    asks = [(m, q) for m in models for q in QUESTIONS] + [(m, "greet kim") for m in models]
    threads = [threading.Thread(target=call, args=ask) for ask in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (model, question), answers in got.items():
        assert set(answers) == {alone[model, question]}, (model, question)
    running = [
        e for e in engines.engines() if e.folder == kernel.models.get("tiny").model.engine.folder
    ]
    assert len(running) == 1
    assert len(kernel.recorder.of("engine.started")) == started  # no restart, no second engine


def test_an_adapter_registered_while_serving_loads_without_a_restart(
    kernel: Kernel, root, tiny_dir
) -> None:
    import attrs

    from .conftest import tune_lora

    engine = kernel.models.get("tiny").model.engine
    chat(kernel, "tiny", "greet kim")  # the engine is serving
    base = kernel.registry.store.get("tiny-hf")
    card = tune_lora(kernel, base, tiny_dir, root / "lora-c", "see you, {name}")
    kernel.registry.register(attrs.evolve(card, name="lora-c", provider="vllm"))
    kernel.registry.register(attrs.evolve(card, name="lora-c-hf"))
    assert chat(kernel, "lora-c", "greet kim") == chat(kernel, "lora-c-hf", "greet kim")
    assert kernel.models.get("lora-c").model.engine is engine
    assert {"tiny@1", "lora-a@1", "lora-b@1", "lora-c@1"} <= set(engine.models)


def test_an_unknown_adapter_is_not_found(kernel: Kernel) -> None:
    with pytest.raises(NotFoundError, match="'lora-zzz' not found"):
        chat(kernel, "lora-zzz", "greet kim")
