"""``llmos models …``: the registry from the command line.

Every command works on the local registry file (several processes may share
it with a running daemon), except ``push``, which uploads through the daemon
so that the files land in the daemon's artifact store. Tables for people,
``--json`` for programs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmos.cli_context import current_kernel
from llmos.errors import LlmosError, UsageError
from llmos.output import emit_json, json_option
from llmos.registry.cardfile import card_to_markdown, read_card_file
from llmos.registry.service import Registry
from llmos.registry.store import SearchHit, VersionInfo
from llmos.types import ModelCard

#: given the click context, the registry to work on (set by the CLI's root)
RegistryGetter = Callable[[click.Context], Registry]


def _human_params(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def _cards_table(title: str, rows: Sequence[SearchHit | VersionInfo]) -> None:
    table = Table(title=title)
    for column in ("model", "status", "aliases", "provider", "tasks", "family", "params", "tags"):
        table.add_column(column, overflow="fold")
    for row in rows:
        card = row.card
        table.add_row(
            card.ref,
            str(row.status),
            ", ".join(row.aliases),
            card.provider,
            ", ".join(card.tasks),
            card.family or "-",
            _human_params(card.parameters),
            ", ".join(card.tags),
        )
    Console().print(table)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, values typed as JSON where they parse (``3``,
    ``true``, ``["a"]``), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def models_group(get_registry: RegistryGetter) -> click.Group:
    """Build the ``models`` command group on top of ``get_registry``."""

    @click.group("models")
    def models() -> None:
        """Register, find and manage models in the registry."""

    def registry() -> Registry:
        return get_registry(click.get_current_context())

    @models.command("register")
    @click.argument("name", required=False)
    @click.option("--provider", help="Provider that serves it (transformers, vllm, …).")
    @click.option(
        "--source", default="", help="Path under an allowed root, pkg://, hf:// or https://."
    )
    @click.option("--task", "tasks", multiple=True, help="A task (repeat): chat, embedding, …")
    @click.option("--family", help="Architecture family (llama, bert, …).")
    @click.option("--parameters", type=click.IntRange(min=0), help="Parameter count.")
    @click.option(
        "--format", "format_", help="safetensors, gguf, remote-api, adapter, fusion, other."
    )
    @click.option("--license", "license_", help="Licence identifier, e.g. apache-2.0.")
    @click.option("--description", default="", help="What the model is for.")
    @click.option("--tag", "tags", multiple=True, help="A tag (repeat).")
    @click.option(
        "--option", "options", multiple=True, metavar="KEY=VALUE", help="Provider option (repeat)."
    )
    @click.option(
        "--from-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read the card from a JSON or README-style card file; flags override it.",
    )
    @json_option
    def register(
        name: str | None,
        provider: str | None,
        source: str,
        tasks: tuple[str, ...],
        family: str | None,
        parameters: int | None,
        format_: str | None,
        license_: str | None,
        description: str,
        tags: tuple[str, ...],
        options: tuple[str, ...],
        from_file: Path | None,
        as_json: bool,
    ) -> None:
        """Register NAME as a new version (1, 2, 3 … per name)."""
        fields: dict[str, Any] = {}
        if from_file is not None:
            fields = read_card_file(from_file).to_dict()
            fields.pop("version", None)
            fields.pop("created_at", None)
        given = {
            "name": name,
            "provider": provider,
            "source": source,
            "tasks": tasks,
            "family": family,
            "parameters": parameters,
            "format": format_,
            "license": license_,
            "description": description,
            "tags": tags,
            "options": _options(options),
        }
        fields.update({k: v for k, v in given.items() if v not in (None, "", (), {})})
        for required in ("name", "provider"):
            if not fields.get(required):
                raise UsageError(f"a model needs a {required}: give --{required} or a card file")
        card = registry().submit(ModelCard.from_dict(fields), created_by=_user())
        if as_json:
            emit_json({"card": card.to_dict()})
        else:
            click.echo(f"registered {card.ref}")

    @models.command("show")
    @click.argument("ref")
    @click.option("--card", "as_card", is_flag=True, help="Print a README-style model card.")
    @json_option
    def show(ref: str, as_card: bool, as_json: bool) -> None:
        """Show one model: NAME (its latest version), NAME@3 or NAME@ALIAS."""
        reg = registry()
        card = reg.store.get(ref)
        info = next(v for v in reg.store.versions(card.name) if v.card.version == card.version)
        if as_json:
            emit_json(info.to_dict())
        elif as_card:
            click.echo(card_to_markdown(card), nl=False)
        else:
            for key, value in card.to_dict().items():
                if value not in (None, "", [], {}):
                    click.echo(
                        f"{key:12} {json.dumps(value) if not isinstance(value, str) else value}"
                    )
            click.echo(f"{'status':12} {info.status}")
            click.echo(f"{'aliases':12} {', '.join(info.aliases) or '-'}")

    @models.command("versions")
    @click.argument("name")
    @json_option
    def versions(name: str, as_json: bool) -> None:
        """List every version of NAME with its status and aliases."""
        rows = registry().store.versions(name)
        if as_json:
            emit_json([row.to_dict() for row in rows])
        else:
            _cards_table(f"versions of {name}", rows)

    @models.command("search")
    @click.argument("query", nargs=-1)
    @click.option(
        "--sort",
        type=click.Choice(["relevance", "name", "created", "parameters"]),
        default="relevance",
        show_default=True,
    )
    @click.option("--desc/--asc", "descending", default=None, help="Sort direction.")
    @click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
    @click.option("--offset", type=click.IntRange(min=0), default=0)
    @click.option("--cursor", help="Continue from a previous page's next_cursor.")
    @click.option("--all-versions", is_flag=True, help="Every version, not each model's latest.")
    @json_option
    def search(
        query: tuple[str, ...],
        sort: str,
        descending: bool | None,
        limit: int,
        offset: int,
        cursor: str | None,
        all_versions: bool,
        as_json: bool,
    ) -> None:
        """Find models: free text plus filters, e.g.

        \b
          llmos models search sentiment task:text-classification
          llmos models search '(family:bert OR family:roberta) NOT tag:old params:<200M'
        """
        page = registry().store.search(
            " ".join(query),
            sort=sort,
            descending=descending,
            limit=limit,
            offset=offset,
            cursor=cursor,
            all_versions=all_versions,
        )
        if as_json:
            emit_json(page.to_dict())
            return
        more = "" if page.total_exact else "+"
        _cards_table(f"{page.total}{more} model(s)", page.items)
        if page.next_cursor:
            click.echo(f"more: --cursor {page.next_cursor}")

    @models.command("alias")
    @click.argument("name")
    @click.argument("alias")
    @click.argument("version", type=click.IntRange(min=1), required=False)
    @click.option("--remove", is_flag=True, help="Remove the alias instead.")
    def alias(name: str, alias: str, version: int | None, remove: bool) -> None:
        """Point ALIAS of NAME at VERSION (or --remove it). `latest` is automatic."""
        store = registry().store
        if remove:
            store.remove_alias(name, alias)
            click.echo(f"removed {name}@{alias}")
            return
        if version is None:
            raise UsageError("give the VERSION the alias points at, or --remove")
        store.set_alias(name, alias, version)
        click.echo(f"{name}@{alias} -> {version}")

    @models.command("tag")
    @click.argument("ref")
    @click.argument("tags", nargs=-1, required=True)
    @click.option("--remove", is_flag=True, help="Remove the tags instead.")
    def tag(ref: str, tags: tuple[str, ...], remove: bool) -> None:
        """Add TAGS to a model version (or --remove them)."""
        store = registry().store
        card = store.untag(ref, *tags) if remove else store.tag(ref, *tags)
        click.echo(f"{card.ref}: {', '.join(card.tags) or 'no tags'}")

    @models.command("describe")
    @click.argument("ref")
    @click.argument("text")
    def describe(ref: str, text: str) -> None:
        """Set the description of a model version."""
        card = registry().store.set_description(ref, text)
        click.echo(f"{card.ref}: description updated")

    @models.command("deprecate")
    @click.argument("ref")
    def deprecate(ref: str) -> None:
        """Mark a version deprecated (still resolvable, flagged in listings)."""
        card = registry().store.deprecate(ref)
        click.echo(f"{card.ref}: deprecated")

    @models.command("delete")
    @click.argument("ref")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def delete(ref: str, yes: bool) -> None:
        """Delete a version (soft: hidden from search; `latest` moves back)."""
        store = registry().store
        card = store.get(ref)
        if not yes:
            click.confirm(f"delete {card.ref}?", abort=True)
        store.delete(card.ref)
        click.echo(f"{card.ref}: deleted")

    @models.command("scan")
    @click.argument("path", type=click.Path(exists=True, path_type=Path))
    @json_option
    def scan(path: Path, as_json: bool) -> None:
        """Register the Hugging Face folders and GGUF files under PATH."""
        registered, result = registry().scan(path.resolve(), created_by=_user())
        if as_json:
            emit_json(
                {
                    "registered": [card.to_dict() for card in registered],
                    "skipped": [{"path": str(p), "reason": r} for p, r in result.skipped],
                }
            )
            return
        for card in registered:
            click.echo(
                f"registered {card.ref}  ({card.family or '?'}, {_human_params(card.parameters)})"
            )
        for skipped, reason in result.skipped:
            click.echo(f"skipped {skipped}: {reason}", err=True)
        if not registered:
            click.echo("no models found", err=True)

    @models.command("discover")
    @json_option
    @click.pass_context
    def discover(ctx: click.Context, as_json: bool) -> None:
        """Register the models installed plugins offer (packaged weights …)."""
        report = current_kernel(ctx).discover_models()
        if as_json:
            emit_json(report.to_dict())
            return
        for card in report.registered:
            click.echo(f"registered {card.ref}")
        for plugin, name, reason in report.refused:
            click.echo(f"refused {name} from {plugin}: {reason}", err=True)
        click.echo(f"{len(report.registered)} new, {len(report.unchanged)} unchanged")

    @models.command("push")
    @click.argument("src", type=click.Path(exists=True, path_type=Path))
    @click.option("--name", required=True, help="Model name to register the upload as.")
    @click.option("--description", help="What the model is for.")
    @click.option("--tag", "tags", multiple=True, help="A tag (repeat).")
    @click.option("--task", "tasks", multiple=True, help="A task (repeat).")
    @click.option("--url", help="The daemon (default: http://<server.host>:<server.port>).")
    @click.option(
        "--api-key-env",
        default="LLMOS_API_KEY",
        show_default=True,
        help="Environment variable holding the daemon's API key, if it needs one.",
    )
    @json_option
    @click.pass_context
    def push(
        ctx: click.Context,
        src: Path,
        name: str,
        description: str | None,
        tags: tuple[str, ...],
        tasks: tuple[str, ...],
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Upload a model FOLDER, ARCHIVE (.tar.gz, .zip) or weights file
        through the daemon into its artifact store, as a new version of --name."""
        server = current_kernel(ctx).config.server
        base = url or f"http://{server.host}:{server.port}"
        with _upload_file(src) as (upload, filename):
            card = _push(base, name, upload, filename, description, tags, tasks, api_key_env)
        if as_json:
            emit_json({"card": card})
        else:
            click.echo(f"pushed {card['name']}@{card['version']} ({card['format']})")

    return models


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "unknown")


@contextlib.contextmanager
def _upload_file(src: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, filename)`` of what to upload: the file itself, or a
    temporary .tar.gz of a folder (removed afterwards)."""
    if src.is_file():
        yield src, src.name
        return
    # The daemon refuses links; say so before packing gigabytes.
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise UsageError(f"{path} is a symbolic link; push the files themselves")
    fd, name = tempfile.mkstemp(suffix=".tar.gz", prefix="llmos-push-")
    os.close(fd)
    temp = Path(name)
    try:
        with tarfile.open(temp, "w:gz") as archive:
            archive.add(src, arcname=src.name)
        yield temp, f"{src.name}.tar.gz"
    finally:
        temp.unlink(missing_ok=True)


def _push(
    base: str,
    name: str,
    upload: Path,
    filename: str,
    description: str | None,
    tags: Sequence[str],
    tasks: Sequence[str],
    api_key_env: str,
) -> dict[str, Any]:
    import httpx
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    params: list[tuple[str, str]] = [("filename", filename)]
    params += [("tags", t) for t in tags] + [("tasks", t) for t in tasks]
    if description:
        params.append(("description", description))
    headers = {"Content-Length": str(upload.stat().st_size)}
    if key := os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    size = upload.stat().st_size

    def chunks(progress: Progress, task: Any) -> Iterator[bytes]:
        with upload.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                progress.advance(task, len(chunk))
                yield chunk

    with Progress(
        *Progress.get_default_columns(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(f"pushing {filename}", total=size)
        try:
            response = httpx.put(
                f"{base}/api/models/{name}/artifact",
                params=params,
                content=chunks(progress, task),
                headers=headers,
                timeout=httpx.Timeout(30.0, read=600.0),
            )
        except httpx.TransportError as exc:
            raise LlmosError(
                f"cannot reach the daemon at {base} ({exc}); start it with `llmos serve` "
                "or give --url"
            ) from exc
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise LlmosError(f"the daemon refused the push ({response.status_code}): {message}")
    return response.json()["card"]
