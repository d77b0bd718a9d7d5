"""``llmos plugin new``, end to end: the distribution it writes installs,
passes its own tests and is listed by ``llmos plugins``, outside the repo.

The plugin is installed into a throwaway virtual environment, not into the
one the suite runs in, where it would stay loaded for every other test. That
environment sees this one's packages (llmos, pip, hatchling, pytest) through
a ``.pth`` file, so nothing is downloaded: ``python -m venv
--system-site-packages`` run from inside a venv would see the base
interpreter's packages, not this venv's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import llmos

pytestmark = pytest.mark.slow


def venv_over_this_one(root: Path) -> Path:
    """A new virtual environment whose ``sys.path`` ends with this one's
    site-packages (their ``.pth`` files included); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "llmos-parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def run(*args: object, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_new_plugin_installs_passes_its_tests_and_is_listed(
    env: dict[str, str], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    made = llmos("plugin", "new", "demo", "--dir", str(work), env=env)
    assert made.returncode == 0, made.stderr
    plugin = work / "llmos-demo"

    python = venv_over_this_one(tmp_path / "venv")
    install = run(
        python,
        *("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"),
        *("--disable-pip-version-check", "-e", plugin),
        env=env,
        cwd=work,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    # The generated tests: entry point, then complete, chat, stream through a
    # real kernel, and a chat over HTTP through a real daemon.
    tests = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", plugin, env=env, cwd=work)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "5 passed" in tests.stdout

    listed = run(python, "-m", "llmos.cli", "plugins", "--json", env=env, cwd=work)
    assert listed.returncode == 0, listed.stderr
    demo = next(p for p in json.loads(listed.stdout) if p["name"] == "demo")
    assert (demo["status"], demo["distribution"], demo["version"]) == (
        "loaded",
        "llmos-demo",
        "0.1.0",
    )
    assert demo["registered"] == {"providers": ["demo-reverse"]}
    assert demo["warnings"] == []

    # The README's "Try it", as written.
    register = run(
        python,
        *("-m", "llmos.cli", "models", "register", "demo/reverse"),
        *("--provider", "demo-reverse"),
        env=env,
        cwd=work,
    )
    assert register.returncode == 0, register.stderr
    complete = run(
        python, "-m", "llmos.cli", "complete", "demo/reverse", "one two three", env=env, cwd=work
    )
    assert (complete.returncode, complete.stdout) == (0, "three two one\n"), complete.stderr

    # This environment never saw the plugin.
    assert llmos("plugins", "--json", env=env).stdout.count('"demo"') == 0
