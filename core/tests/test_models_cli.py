"""``llmos models …`` end to end: the console script on a real registry file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from llmos.registry import SQLiteStore
from llmos.registry.store import COUNT_LIMIT
from llmos.testing import write_distribution, write_safetensors
from llmos.types import ModelCard

from .conftest import LLMOS, llmos


def ok(*args: str, env: dict[str, str]) -> str:
    run = llmos(*args, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def as_json(*args: str, env: dict[str, str]):
    return json.loads(ok(*args, "--json", env=env))


def json_in(folder: Path, *args: str, env: dict[str, str]):
    """``llmos ARGS --json`` run in ``folder``."""
    run = subprocess.run(
        [LLMOS, *args, "--json"],
        env=env, cwd=folder, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture
def populated(env: dict[str, str]) -> dict[str, str]:
    ok(
        "models", "register", "acme/bert-sentiment", "--provider", "transformers",
        "--task", "text-classification", "--family", "bert", "--parameters", "110000000",
        "--description", "BERT fine-tuned for sentiment analysis of reviews",
        "--tag", "nlp", "--license", "apache-2.0", env=env,
    )  # fmt: skip
    ok(
        "models", "register", "acme/llama-chat", "--provider", "transformers",
        "--task", "chat", "--family", "llama", "--parameters", "7000000000",
        "--source", "hf://meta-llama/Llama-2-7b-chat-hf", "--option", "dtype=float16",
        "--option", "max_batch=8", env=env,
    )  # fmt: skip
    ok(
        "models", "register", "other/roberta-news", "--provider", "transformers",
        "--task", "text-classification", "--family", "roberta", "--parameters", "125000000",
        "--description", "news topic classifier", "--tag", "nlp", env=env,
    )  # fmt: skip
    return env


#: a plugin distribution with a second provider for the same models
ENGINE = """
from llmos.plugin import hookimpl
from llmos.types import ProviderSpec


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="acme-engine", load=lambda request: None))
"""


def names(page: dict) -> list[str]:
    return sorted(hit["card"]["name"] for hit in page["items"])


def test_register_assigns_versions_and_show_resolves_refs(populated: dict[str, str]) -> None:
    env = populated
    write_distribution(Path(env["PYTHONPATH"]), "llmos-acme-engine", ENGINE)
    card = as_json("models", "register", "acme/llama-chat", "--provider", "acme-engine", env=env)[
        "card"
    ]
    assert (card["name"], card["version"], card["provider"]) == (
        "acme/llama-chat",
        2,
        "acme-engine",
    )
    shown = as_json("models", "show", "acme/llama-chat@1", env=env)
    assert shown["card"]["options"] == {"dtype": "float16", "max_batch": 8}
    assert shown["card"]["source"] == "hf://meta-llama/Llama-2-7b-chat-hf"
    assert as_json("models", "show", "acme/llama-chat", env=env)["aliases"] == ["latest"]
    assert as_json("models", "show", "acme/llama-chat", env=env)["card"]["version"] == 2


def test_search_with_free_text_filters_and_boolean_operators(populated: dict[str, str]) -> None:
    env = populated
    assert names(as_json("models", "search", "sentiment", env=env)) == ["acme/bert-sentiment"]
    page = as_json("models", "search", "task:text-classification", "NOT", "family:bert", env=env)
    assert names(page) == ["other/roberta-news"]
    page = as_json("models", "search", "(family:bert OR family:llama) params:<1B", env=env)
    assert names(page) == ["acme/bert-sentiment"]
    page = as_json("models", "search", "--limit", "1", "--sort", "name", env=env)
    assert page["total"] == 3 and len(page["items"]) == 1 and page["next_cursor"]
    rest = as_json("models", "search", "--sort", "name", "--cursor", page["next_cursor"], env=env)
    assert names(page) + names(rest) == sorted(
        ["acme/bert-sentiment", "acme/llama-chat", "other/roberta-news"]
    )


def test_search_says_when_the_total_is_only_a_lower_bound(env: dict[str, str]) -> None:
    with SQLiteStore(Path(env["LLMOS_HOME"]) / "registry.db") as store:
        store.register_many(
            ModelCard(name=f"bulk/m{i:04d}", provider="transformers", tags=("bulk",))
            for i in range(COUNT_LIMIT + 1)
        )
    assert f"{COUNT_LIMIT}+ model(s)" in ok("models", "search", "tag:bulk", env=env)
    page = as_json("models", "search", "tag:bulk", env=env)
    assert (page["total"], page["total_exact"]) == (COUNT_LIMIT, False)
    assert "1 model(s)" in ok("models", "search", "name:bulk/m0001", env=env)


def test_alias_tag_describe_deprecate_delete(populated: dict[str, str]) -> None:
    env = populated
    ok("models", "register", "acme/bert-sentiment", "--provider", "transformers", env=env)
    ok("models", "alias", "acme/bert-sentiment", "prod", "1", env=env)
    assert as_json("models", "show", "acme/bert-sentiment@prod", env=env)["card"]["version"] == 1
    ok("models", "tag", "acme/bert-sentiment@prod", "reviewed", env=env)
    ok("models", "tag", "acme/bert-sentiment@prod", "nlp", "--remove", env=env)
    assert as_json("models", "show", "acme/bert-sentiment@1", env=env)["card"]["tags"] == [
        "reviewed"
    ]
    ok("models", "describe", "acme/bert-sentiment@1", "reviews, now calibrated", env=env)
    ok("models", "deprecate", "acme/bert-sentiment@1", env=env)
    versions = as_json("models", "versions", "acme/bert-sentiment", env=env)
    assert [(v["card"]["version"], v["status"], v["aliases"]) for v in versions] == [
        (1, "deprecated", ["prod"]),
        (2, "active", ["latest"]),
    ]
    ok("models", "delete", "acme/bert-sentiment@2", "--yes", env=env)
    assert as_json("models", "show", "acme/bert-sentiment", env=env)["card"]["version"] == 1
    ok("models", "alias", "acme/bert-sentiment", "prod", "--remove", env=env)
    gone = llmos("models", "show", "acme/bert-sentiment@prod", env=env)
    assert gone.returncode == 4 and gone.stderr.startswith("error: ")


def test_bad_input_is_refused_with_one_line_and_nothing_written(
    populated: dict[str, str],
) -> None:
    env = populated
    db = Path(env["LLMOS_HOME"]) / "registry.db"
    count = sqlite3.connect(db).execute("SELECT COUNT(*) FROM versions").fetchone()[0]
    for args, code, words in (
        (("--source", "file:///etc/passwd"), 2, "file:// URLs are not accepted"),
        (("--source", "../../etc/passwd"), 2, "refused"),
        (("--source", "https://user:pw@example.com/m.tgz"), 2, "credentials"),
        (("--source", "https://169.254.169.254/latest"), 2, "metadata"),
    ):
        run = llmos("models", "register", "acme/evil", "--provider", "x", *args, env=env)
        assert run.returncode == code, run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith("error: ") and words in line
    run = llmos("models", "register", "../evil", "--provider", "x", env=env)
    assert run.returncode == 2 and "contains '..'" in run.stderr
    run = llmos("models", "register", "acme/x", env=env)
    assert run.returncode == 2 and "needs a provider" in run.stderr
    run = llmos("models", "search", "family:", env=env)
    assert run.returncode == 2 and run.stderr.startswith("error: ")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM versions").fetchone()[0] == count


def test_a_version_nothing_can_serve_does_not_shadow_the_latest(
    populated: dict[str, str],
) -> None:
    """``acme/llama-chat@1`` is served by transformers; a second version for
    a provider that is not installed, or posing as a fusion, would become
    ``latest`` and take its place."""
    env = populated
    for args, words in (
        (("--provider", "vllm"), ("provider 'vllm' is not installed", "pip install llmos-vllm")),
        (("--provider", "nope"), ("provider 'nope' is not installed", "transformers (")),
        (("--provider", "fusion"), ("`llmos fuse create` or POST /api/fusions",)),
        (("--provider", "transformers", "--format", "fusion"), ("`llmos fuse create`",)),
    ):
        run = llmos("models", "register", "acme/llama-chat", *args, env=env)
        assert run.returncode == 2, run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith("error: ") and all(word in line for word in words), line
    latest = as_json("models", "show", "acme/llama-chat", env=env)["card"]
    assert (latest["version"], latest["provider"]) == (1, "transformers")


def test_scan_registers_a_local_folder(env: dict[str, str], tmp_path: Path) -> None:
    home = Path(env["LLMOS_HOME"])
    model = home / "models" / "Tiny-Llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 1000,
            }
        )
    )
    write_safetensors(model / "model.safetensors", {"w": [64, 1000]})
    result = as_json("models", "scan", str(home / "models"), env=env)
    (card,) = result["registered"]
    assert (card["name"], card["family"], card["parameters"]) == ("tiny-llama", "llama", 64_000)
    assert card["tasks"] == ["text-generation"] and card["format"] == "safetensors"
    # scanning again registers nothing new
    assert as_json("models", "scan", str(home / "models"), env=env)["registered"][0]["version"] == 1
    outside = llmos("models", "scan", str(tmp_path), env=env)
    assert outside.returncode == 2 and "allowed" in outside.stderr
    # a relative path is the user's, relative to where the command runs
    (again,) = json_in(home, "models", "scan", "models", env=env)["registered"]
    assert (again["version"], again["source"]) == (1, str(model.resolve()))


def test_relative_sources_are_the_users_and_stored_absolute(
    env: dict[str, str], tmp_path: Path
) -> None:
    home = Path(env["LLMOS_HOME"])
    models = home / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "other").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny = str((models / "tiny").resolve())

    # --source: relative to where the command runs
    flag = ("--provider", "transformers", "--source", "tiny")
    card = json_in(models, "models", "register", "acme/flag", *flag, env=env)["card"]
    assert card["source"] == tiny
    outside = subprocess.run(
        [LLMOS, "models", "register", "acme/flag", *flag],
        env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert outside.returncode == 2 and "outside the allowed roots" in outside.stderr

    # a card file's source: relative to the card file, wherever the command runs
    (models / "tiny.md").write_text(
        '---\nname: "acme/filed"\nprovider: "transformers"\nsource: "tiny"\n---\n'
    )
    for folder, card_file in ((elsewhere, str(models / "tiny.md")), (home, "models/tiny.md")):
        card = json_in(folder, "models", "register", "--from-file", card_file, env=env)["card"]
        assert card["source"] == tiny, folder
    # --source overrides the file's, and is relative to where the command runs
    override = ("--from-file", "models/tiny.md", "--source", "models/other")
    card = json_in(home, "models", "register", *override, env=env)["card"]
    assert card["source"] == str((models / "other").resolve())
    stored = [
        as_json("models", "show", f"acme/filed@{v}", env=env)["card"]["source"] for v in (1, 2, 3)
    ]
    assert stored == [tiny, tiny, str((models / "other").resolve())]
