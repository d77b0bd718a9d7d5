"""What every ``llmos`` command prints for programs: ``--json`` and its writer."""

from __future__ import annotations

import json
from typing import Any

import click

#: the ``--json`` flag of a command (as ``as_json``)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (paths, times … as strings)."""
    click.echo(json.dumps(data, indent=2, default=str))
