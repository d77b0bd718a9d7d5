"""The registry over HTTP: ``/api/models``, and the seed document's
``POST /register`` and ``GET /discover``.

Every route goes through :class:`~llmos.registry.service.Registry`, so the
source checks, the scan rules and the upload checks are the ones the CLI
gets; errors are :class:`~llmos.errors.LlmosError` subclasses and leave in
the daemon's one error shape. Handlers that touch SQLite or files are plain
``def``, which FastAPI runs in its thread pool; the push handler is
``async`` only to stream the body to a file, and hands the file and
database work to the thread pool too.

A local path in a body (a card's ``source``, a scan's ``path``, the seed's
``model_url``) must be absolute: the daemon's working directory is not the
client's (:func:`~llmos.registry.sources.check_client_path`).

Paths take model references with a ``/`` (``vendor/model``) and an
``@version`` or ``@alias``, so they use a ``{ref:path}`` parameter; the routes
with a fixed tail (``/versions``, ``/aliases/...``, ``/tags``, ``/artifact``
...) are declared first, so they win over the bare reference. The one
reading that is ambiguous is ``GET /api/models/<vendor>/versions``: it lists
the versions of ``<vendor>``; a model *named* ``<vendor>/versions`` is
reached as ``GET /api/models/<vendor>/versions@latest``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import Scope

from llmos.errors import LlmosError, NotFoundError, UsageError
from llmos.registry.artifacts import ARCHIVE_SUFFIXES
from llmos.registry.sources import check_client_path, is_path
from llmos.registry.store import MAX_LIMIT, SORTS, RegistryStore
from llmos.runtime.kernel import Kernel
from llmos.types import ModelCard, ModelFormat, validate_model_name

__all__ = ["PUSH_SUFFIXES", "models_router", "push_body_limit"]

PREFIX = "/api/models"
#: the push route; :func:`push_body_limit` matches requests with its regex
PUSH_PATH = PREFIX + "/{name:path}/artifact"
_PUSH_REGEX = compile_path(PUSH_PATH)[0]
#: what a pushed file's name may end with: a folder archive or one weights file
PUSH_SUFFIXES = (*ARCHIVE_SUFFIXES, ".gguf", ".safetensors")
#: ``created_by`` of what the HTTP API registers
CREATED_BY = "api"
#: the pushed body is written to disk in pieces of about this size
_WRITE_CHUNK = 1 << 20
#: words in a ``/register`` description that name a task: the seed
#: document's clients send none. One entry on purpose; wider guesses mislead.
_TASK_WORDS = (("classification", "text-classification"),)

_TAGS = ["models"]
_SEED_TAGS = ["models (seed API)"]


# --------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: a JSON 5 is not the string "5", "true" is not a boolean.
    model_config = ConfigDict(extra="forbid", strict=True)


class CardIn(_Body):
    """A model card to register as the next version of its name."""

    name: str = Field(description="'model' or 'vendor/model'")
    provider: str = Field(
        description="An installed provider that loads it: transformers, vllm ... (fusions are"
        " made with POST /api/fusions)"
    )
    source: str = Field(
        "",
        description="An absolute path under an allowed root, pkg://dist/path, hf://org/name,"
        " https://, or an artifact's URL inside [artifacts] root",
    )
    tasks: list[str] = []
    family: str | None = None
    parameters: int | None = Field(None, ge=0)
    # Not strict: JSON has no enums, and a strict enum takes only ModelFormat itself.
    format: ModelFormat = Field(ModelFormat.OTHER, strict=False)
    license: str | None = None
    description: str = ""
    tags: list[str] = []
    scores: dict[str, float] = {}
    parents: list[str] = []
    options: dict[str, Any] = {}
    if_changed: bool = Field(
        False, description="Return the latest version instead of adding one equal to it"
    )


class AliasIn(_Body):
    version: int = Field(ge=1, description="The version the alias points at")


class TagsIn(_Body):
    tags: list[str] = Field(min_length=1)


class DescriptionIn(_Body):
    description: str


class ScanIn(_Body):
    path: str = Field(
        min_length=1,
        description="The absolute path of a folder or .gguf file under home or [registry]"
        " allowed_roots",
    )


class SeedRegisterIn(_Body):
    """The seed document's registration: a name, a URL and a description."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_url: str = Field(
        min_length=1,
        description="Where the weights are: https://, hf://, pkg:// or an absolute path",
    )
    model_description: str = ""
    provider: str = Field(
        "transformers", description="Must be installed when given; the default need not be"
    )
    tasks: list[str] | None = Field(
        None, description="Default: text-classification when the description mentions it"
    )
    tags: list[str] = []
    license: str | None = None


# --------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------


def models_router(kernel: Kernel) -> APIRouter:
    """The registry routes for ``kernel``'s registry (opened on first use)."""
    router = APIRouter()

    def store() -> RegistryStore:
        return kernel.registry.store

    # ---------------------------------------------------------- collection

    @router.get(PREFIX, tags=_TAGS, summary="Search models")
    def search(
        q: Annotated[str | None, Query(description="A query in the registry's language")] = None,
        query: Annotated[str | None, Query(description="Another name for q")] = None,
        sort: Annotated[
            str, Query(description=", ".join(SORTS), json_schema_extra={"enum": list(SORTS)})
        ] = "relevance",
        desc: Annotated[bool | None, Query(description="Reverse the sort's own order")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
        cursor: Annotated[str | None, Query(description="next_cursor of the last page")] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        all_versions: Annotated[bool, Query(description="Every version, not the latest")] = False,
    ) -> dict[str, Any]:
        page = store().search(
            _query_text(q, query),
            sort=sort,
            descending=desc,
            limit=limit,
            offset=offset,
            cursor=cursor,
            all_versions=all_versions,
        )
        return page.to_dict()

    @router.post(PREFIX, status_code=201, tags=_TAGS, summary="Register a model card")
    def register(body: CardIn) -> dict[str, Any]:
        check_client_path(body.source, kernel.registry.policy)
        card = ModelCard.from_dict(body.model_dump(exclude={"if_changed"}))
        stored = kernel.registry.submit(card, CREATED_BY, if_changed=body.if_changed)
        return {"card": stored.to_dict()}

    @router.post(PREFIX + "/scan", tags=_TAGS, summary="Register the models found under a path")
    def scan(body: ScanIn) -> dict[str, Any]:
        if not is_path(body.path):
            raise UsageError(
                f"path {body.path[:200]!r} is a URL; scan reads a folder on the daemon's"
                " machine (register a URL source with POST /api/models)",
                param="path",
            )
        check_client_path(body.path, kernel.registry.policy, param="path")
        registered, result = kernel.registry.scan(Path(body.path), CREATED_BY)
        return {
            "registered": [card.to_dict() for card in registered],
            "skipped": [{"path": str(path), "reason": why} for path, why in result.skipped],
        }

    @router.post(
        PREFIX + "/discover", tags=_TAGS, summary="Register what model-source plugins offer"
    )
    def discover() -> dict[str, Any]:
        return kernel.discover_models().to_dict()

    # ------------------------------------------- one model: fixed tails first

    @router.get(PREFIX + "/{name:path}/versions", tags=_TAGS, summary="List a model's versions")
    def versions(name: str) -> dict[str, Any]:
        return {"name": name, "versions": [info.to_dict() for info in store().versions(name)]}

    @router.put(PREFIX + "/{name:path}/aliases/{alias}", tags=_TAGS, summary="Set an alias")
    def set_alias(name: str, alias: str, body: AliasIn) -> dict[str, Any]:
        store().set_alias(name, alias, body.version)
        return {"name": name, "alias": alias, "version": body.version}

    @router.delete(PREFIX + "/{name:path}/aliases/{alias}", tags=_TAGS, summary="Remove an alias")
    def remove_alias(name: str, alias: str) -> dict[str, Any]:
        store().remove_alias(name, alias)
        return {"name": name, "alias": alias, "deleted": True}

    @router.post(PREFIX + "/{ref:path}/tags", tags=_TAGS, summary="Add tags to a version")
    def add_tags(ref: str, body: TagsIn) -> dict[str, Any]:
        return _info(store(), store().tag(ref, *body.tags))

    @router.delete(
        PREFIX + "/{ref:path}/tags/{tag}", tags=_TAGS, summary="Remove a tag from a version"
    )
    def remove_tag(ref: str, tag: str) -> dict[str, Any]:
        return _info(store(), store().untag(ref, tag))

    @router.post(PREFIX + "/{ref:path}/deprecate", tags=_TAGS, summary="Deprecate a version")
    def deprecate(ref: str) -> dict[str, Any]:
        return _info(store(), store().deprecate(ref))

    @router.put(
        PUSH_PATH,
        status_code=201,
        tags=_TAGS,
        summary="Push weights: an archive or weights file as the next version",
        description=(
            "The body is the raw file: a folder archive (.tar, .tar.gz, .tgz, .tar.bz2,"
            " .tar.xz, .zip) or one .gguf or .safetensors file, named by `filename`."
            " Capped at [registry] max_push_bytes."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def push(
        request: Request,
        name: str,
        filename: Annotated[str, Query(description="The file's name; its suffix gives its type")],
        description: str | None = None,
        tags: Annotated[list[str] | None, Query(description="A tag (repeat)")] = None,
        tasks: Annotated[list[str] | None, Query(description="A task (repeat)")] = None,
        provider: str | None = None,
        license: str | None = None,
    ) -> dict[str, Any]:
        # Refuse a bad name before reading a byte of what may be gigabytes.
        validate_model_name(name)
        _check_filename(filename)
        registry = kernel.registry
        if provider:
            await run_in_threadpool(registry.require_provider, provider)
        folder = await run_in_threadpool(_upload_folder, kernel.home)
        try:
            upload = folder / filename
            await _receive_to(request, upload)
            card = await run_in_threadpool(
                registry.push,
                name,
                upload,
                CREATED_BY,
                description=description,
                tags=tuple(tags or ()),
                tasks=tuple(tasks or ()),
                provider=provider,
                license=license,
            )
        finally:
            # Shielded: a cancelled request must still not leave its upload behind.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(shutil.rmtree, folder, True)
        return {"card": card.to_dict()}

    # ------------------------------------------------- one model: the bare ref

    @router.get(PREFIX + "/{ref:path}", tags=_TAGS, summary="Get a version's card")
    def get(ref: str) -> dict[str, Any]:
        return _info(store(), store().get(ref))

    @router.patch(PREFIX + "/{ref:path}", tags=_TAGS, summary="Replace a version's description")
    def describe(ref: str, body: DescriptionIn) -> dict[str, Any]:
        return _info(store(), store().set_description(ref, body.description))

    @router.delete(PREFIX + "/{ref:path}", tags=_TAGS, summary="Delete a version (kept on record)")
    def delete(ref: str) -> dict[str, Any]:
        return _info(store(), store().delete(ref))

    # ---------------------------------------------------- the seed document

    @router.post(
        "/register",
        status_code=201,
        tags=_SEED_TAGS,
        summary="Register a model (seed document form)",
        description=(
            "provider defaults to transformers; without tasks, a description that mentions"
            " classification gives the task text-classification. Registering the same card"
            " again returns the version already there."
        ),
    )
    def seed_register(body: SeedRegisterIn) -> dict[str, Any]:
        check_client_path(body.model_url, kernel.registry.policy, param="model_url")
        tasks = body.tasks if body.tasks is not None else _infer_tasks(body.model_description)
        card = ModelCard(
            name=body.model_name,
            provider=body.provider,
            source=body.model_url,
            description=body.model_description,
            tasks=tuple(tasks),
            tags=tuple(body.tags),
            license=body.license,
        )
        # A provider the client names must be installed; the default is a
        # guess made for clients that know none, like a scan's.
        if "provider" in body.model_fields_set:
            stored = kernel.registry.submit(card, CREATED_BY, if_changed=True)
        else:
            stored = kernel.registry.register(card, CREATED_BY, if_changed=True)
        return {
            "message": "Model registered successfully",
            "model": stored.to_dict(),
            "version": stored.version,
        }

    @router.get("/discover", tags=_SEED_TAGS, summary="Find models (seed document form)")
    def seed_discover(
        q: Annotated[str | None, Query(description="A query in the registry's language")] = None,
        query: Annotated[str | None, Query(description="Another name for q")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    ) -> dict[str, Any]:
        page = store().search(_query_text(q, query), limit=limit)
        return {
            "models": [hit.card.name for hit in page.items],
            "results": [hit.to_dict() for hit in page.items],
            "total": page.total,
            "total_exact": page.total_exact,
        }

    return router


def push_body_limit(kernel: Kernel) -> Callable[[Scope], tuple[int, str] | None]:
    """The body-cap chooser for :class:`~llmos.server.middleware.BodyLimitMiddleware`:
    a push takes ``[registry] max_push_bytes``, every other request the global cap."""

    def limit_for(scope: Scope) -> tuple[int, str] | None:
        if scope.get("method") == "PUT" and _PUSH_REGEX.match(scope.get("path", "")):
            return kernel.registry.policy.max_push_bytes, "registry.max_push_bytes"
        return None

    return limit_for


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _info(store: RegistryStore, card: ModelCard) -> dict[str, Any]:
    """``{"card", "status", "aliases"}`` of the version ``card`` is."""
    for info in store.versions(card.name):
        if info.card.version == card.version:
            return info.to_dict()
    raise NotFoundError(f"model {card.ref} is no longer in the registry")


def _query_text(q: str | None, query: str | None) -> str:
    if q is not None and query is not None and q != query:
        raise UsageError("give the search as q or as query, not both", param="q")
    return q if q is not None else query or ""


def _infer_tasks(description: str) -> list[str]:
    text = description.lower()
    return [task for word, task in _TASK_WORDS if word in text]


def _check_filename(filename: str) -> None:
    """Refuse anything but a plain file name with a suffix a push may have."""
    if (
        filename in ("", ".", "..")
        or len(filename) > 255
        or "/" in filename
        or "\\" in filename
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in filename)
    ):
        raise UsageError(
            f"filename {filename!r} must be a plain file name such as model.tar.gz",
            param="filename",
        )
    if not filename.lower().endswith(PUSH_SUFFIXES):
        raise UsageError(
            f"filename {filename!r} must end in one of {', '.join(PUSH_SUFFIXES)}",
            param="filename",
        )


def _upload_folder(home: Path) -> Path:
    """A new private folder under ``home/tmp`` for one upload."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Path(tempfile.mkdtemp(prefix="push-", dir=tmp))


async def _receive_to(request: Request, path: Path) -> None:
    """Stream the request body into a new file at ``path``, never all of it in memory."""
    pending = bytearray()
    try:
        async with await anyio.open_file(path, "xb") as file:
            async for chunk in request.stream():
                pending += chunk
                if len(pending) >= _WRITE_CHUNK:
                    await file.write(bytes(pending))
                    pending.clear()
            await file.write(bytes(pending))
    except ClientDisconnect:
        # Also how the body cap cuts a body off; its 413 replaces this answer.
        raise UsageError("the upload ended before the whole body arrived") from None
    except OSError as exc:
        raise LlmosError(f"cannot store the upload in {path.parent}: {exc.strerror}") from exc
