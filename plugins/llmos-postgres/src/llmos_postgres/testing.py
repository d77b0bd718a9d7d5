"""A throwaway PostgreSQL server for tests and benchmarks.

:func:`temporary_server` runs Debian's PostgreSQL binaries (``initdb``,
``pg_ctl``, found on ``PATH`` or in ``/usr/lib/postgresql/<version>/bin``,
where the ``postgresql`` package puts them) on a cluster in a fresh folder,
listening on a free loopback port, trust authentication for loopback only,
and removes it all afterwards. PostgreSQL refuses to run as root: as root
the cluster belongs to, and the server runs as, the ``postgres`` user
(Debian's package creates it) or else ``nobody``, through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

__all__ = ["Server", "find_binaries", "server_for_tests", "temporary_server"]

#: what installs the binaries (the repository's script; Debian's package)
INSTALL_HINT = "bash .ci/system-packages (Debian's postgresql package)"


@attrs.frozen
class Server:
    """A running throwaway server: ``dsn`` reaches its ``postgres`` database
    as the superuser ``postgres``."""

    dsn: str
    port: int
    folder: Path


def find_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on ``PATH``, else the
    newest ``/usr/lib/postgresql/*/bin``; None when neither has them."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    candidates = [p for p in candidates if (p / "initdb").exists() and (p / "pg_ctl").exists()]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in path.parent.name.split(".") if x.isdigit())

    return max(candidates, key=version) if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _runner() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs PostgreSQL's programs as a user it
    accepts, and that user's uid and gid (None: this process's own)."""
    if os.getuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError("running as root without runuser: cannot start PostgreSQL")
        return [runuser, "-u", name, "--"], entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextlib.contextmanager
def temporary_server(bin_dir: Path, *, settings: dict[str, str] | None = None) -> Iterator[Server]:
    """A fresh cluster, started; stopped and removed on exit. ``settings``
    are further ``postgres -c`` options (defaults trade durability for speed:
    the data is thrown away)."""
    prefix, uid, gid = _runner()
    # Straight under the temporary folder (not pytest's private one): the
    # server's user must be able to reach it.
    folder = Path(tempfile.mkdtemp(prefix="llmos-pg-"))
    data = folder / "data"
    if uid is not None and gid is not None:
        os.chown(folder, uid, gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    port = _free_port()
    options = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(folder),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        **(settings or {}),
    }
    started = False
    try:
        subprocess.run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        flags = " ".join(f"-c {key}={value}" for key, value in options.items())
        run = subprocess.run(
            [
                *prefix,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "server.log"),
                "-o",
                flags,
                "-w",
                "-t",
                "60",
                "start",
            ],
            capture_output=True,
            env=env,
            text=True,
        )
        if run.returncode != 0:
            log = (folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {run.stderr.strip()}\n{log}")
        started = True
        yield Server(
            dsn=f"host=127.0.0.1 port={port} dbname=postgres user=postgres",
            port=port,
            folder=folder,
        )
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                env=env,
            )
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def server_for_tests() -> Iterator[Server]:
    """:func:`temporary_server` for a pytest session: where the binaries are
    missing the tests skip, or fail where ``LLMOS_REQUIRE_SYSTEM_TOOLS=1``
    (as in CI) says they must run."""
    import pytest  # a test-time helper: pytest is not a dependency of the plugin

    bin_dir = find_binaries()
    if bin_dir is None:
        why = f"PostgreSQL's initdb and pg_ctl are not installed (run `{INSTALL_HINT}`)"
        if os.environ.get("LLMOS_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(why + "; LLMOS_REQUIRE_SYSTEM_TOOLS=1 says they must be", pytrace=False)
        pytest.skip(why)
    with temporary_server(bin_dir) as running:
        yield running
