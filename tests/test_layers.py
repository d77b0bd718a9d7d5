"""The layers of ARCHITECTURE.md hold: import-linter's contracts, no import
cycles in the kernel, and no function-local imports but the listed ones.

The contracts live in the root ``pyproject.toml`` (``[tool.importlinter]``);
``lint-imports`` checks them against the installed packages, so a forbidden
import anywhere in the kernel or a first-party plugin fails this test with the
chain that breaks the rule.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "core" / "src" / "llmos"

#: function-local imports in the kernel that stay, and why: each defers a
#: heavy import from a path that rarely needs it, none dodges a cycle
LOCAL_IMPORTS_ALLOWED = {
    # `llmos serve` alone needs FastAPI and uvicorn; other commands start faster without
    ("llmos.cli", "llmos.server"),
    ("llmos.cli", "llmos.server.app"),
    # `llmos plugin new` alone reads the templates
    ("llmos.cli", "llmos.templates"),
    # test helpers that start a daemon import the server only then
    ("llmos.testing", "llmos.server.app"),
    ("llmos.testing", "llmos.server.run"),
}


def test_the_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is in the dev group: run `make install`"
    done = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in done.stdout


def test_the_kernel_has_no_import_cycles() -> None:
    graph = grimp.build_graph("llmos", exclude_type_checking_imports=True)
    cycles = sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported != importer
        and not imported.startswith(importer + ".")  # a package importing its own module
        and graph.chain_exists(importer=imported, imported=importer)
        and not importer.startswith(imported + ".")  # a module importing its package
    )
    assert cycles == [], f"modules that import each other, directly or not: {cycles}"


def _module(path: Path) -> str:
    parts = path.relative_to(KERNEL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _local_imports(path: Path) -> set[tuple[str, str]]:
    """``(module, imported)`` for each llmos import inside a function of ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("llmos"):
                found.add((_module(path), inner.module or ""))
            elif isinstance(inner, ast.Import):
                found.update(
                    (_module(path), alias.name)
                    for alias in inner.names
                    if alias.name.startswith("llmos")
                )
    return found


def test_no_function_local_imports_but_the_listed_ones() -> None:
    local = set().union(*(_local_imports(path) for path in KERNEL.rglob("*.py")))
    assert sorted(local - LOCAL_IMPORTS_ALLOWED) == [], (
        "import these at the top of the module (a cycle is fixed by moving code, not"
        " by hiding the import in a function)"
    )


#: the modules that may name the Kernel (the composition root itself, the front
#: ends, the hook specs that hand it to ``llmos_startup``, the test helpers):
#: every service is handed narrow collaborators instead — not even an
#: annotation of a service names it
MAY_NAME_KERNEL = (
    "llmos.runtime.kernel",
    "llmos.server",
    "llmos.cli",
    "llmos.cli_context",
    "llmos.plugin.spec",
    "llmos.plugin.manager",
    "llmos.testing",
)


def test_no_service_names_the_kernel_even_for_annotations() -> None:
    graph = grimp.build_graph("llmos", exclude_type_checking_imports=False)
    naming = sorted(
        module
        for module in graph.find_modules_that_directly_import("llmos.runtime.kernel")
        if not module.startswith(MAY_NAME_KERNEL)
        and not module.endswith(".commands")
        and module != "llmos.tuning.evaluate"
    )
    assert naming == [], (
        f"{naming} import the Kernel: hand the service what it uses (a section, a"
        " ModelCaller, a registry opener) in its constructor instead"
    )
