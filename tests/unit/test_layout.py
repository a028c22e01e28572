"""The architecture's import rules, read from every ``import`` statement of every module with
``ast``: lazy imports inside functions and type-only imports in ``if TYPE_CHECKING:`` blocks
included (a type-only import is still a dependency: the module cannot be read, type-checked or
moved without the other, and a circle of them is still a circle).

- ``batchvision.core`` imports nothing of the project: pure code every role shares.
- ``batchvision.client`` imports only ``core`` (and itself): the client library ships alone.
- ``batchvision.server`` never imports ``api``, ``workers``, ``cli`` or ``client``.
- ``batchvision.cli`` is imported by nothing else in the package (RQ's rule for its CLI) but
  the test support, and starts ``api`` and ``workers`` as processes rather than importing them.
- ``batchvision.testing`` (test support, not in the wheel) may import the rest of
  ``batchvision``; nothing of the product (``api``, ``workers``, the rest of ``batchvision``)
  imports it, and outside the product only ``tests/`` and ``bench/`` do.
- Nothing outside ``workers/`` imports TensorFlow or Keras, and ``batchvision`` never imports
  Flask: the API image has no TensorFlow, the workers' no Flask.
- No import circles between the project's modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "workers", "batchvision")
HEAVY = ("tensorflow", "keras")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, known: set[str]) -> Iterator[str]:
    """Every module ``source`` imports, anywhere in the file; ``from a import b`` yields
    ``a.b`` where that is one of the ``known`` modules, else ``a``."""
    tree = ast.parse(source)
    package = module if module in known and _is_package(module) else module.rpartition(".")[0]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in known else base
        stack.extend(ast.iter_child_nodes(node))


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): set(imports_of(p.read_text(), module_name(p), known)) for p in files}


GRAPH = project_graph()


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(rule: str) -> list[str]:
    out = []
    for mod, deps in sorted(GRAPH.items()):
        for dep in sorted(deps):
            if RULES[rule](mod, dep):
                out.append(f"{mod} imports {dep}")
    return out


PROJECT = ("api", "workers", "batchvision")
TESTING = "batchvision.testing"
RULES = {
    "core imports nothing of the project": lambda m, d: (
        _in(m, "batchvision.core") and _in(d, *PROJECT) and not _in(d, "batchvision.core")
    ),
    "client imports only core": lambda m, d: (
        _in(m, "batchvision.client")
        and _in(d, *PROJECT)
        and not _in(d, "batchvision.core", "batchvision.client")
    ),
    "server never imports api, workers, cli or client": lambda m, d: (
        _in(m, "batchvision.server") and _in(d, "api", "workers", "batchvision.cli", "batchvision.client")
    ),
    "nothing but cli and the test support import cli": lambda m, d: (
        _in(d, "batchvision.cli") and not _in(m, "batchvision.cli", TESTING)
    ),
    "the product never imports the test support": lambda m, d: _in(d, TESTING) and not _in(m, TESTING),
    "the test support starts api and workers, never imports them": lambda m, d: (
        _in(m, TESTING) and _in(d, "api", "workers")
    ),
    "cli starts api and workers, never imports them": lambda m, d: (
        _in(m, "batchvision.cli") and _in(d, "api", "workers")
    ),
    "only workers import TensorFlow or Keras": lambda m, d: _in(d, *HEAVY) and not _in(m, "workers"),
    "batchvision never imports Flask": lambda m, d: _in(m, "batchvision") and _in(d, "flask", "werkzeug"),
    "the API never imports the workers": lambda m, d: _in(m, "api") and _in(d, "workers"),
    "the workers never import the API": lambda m, d: _in(m, "workers") and _in(d, "api"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_rule(rule: str) -> None:
    assert violations(rule) == []


def test_no_import_cycles() -> None:
    project = {m: {d for d in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(project[mod]):
            # A package's __init__ re-exporting its own submodules is not a circle.
            if mod.startswith(dep + ".") and _is_package(dep):
                continue
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [mod, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(project):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def _repository_sources() -> Iterator[Path]:
    """Every Python file of the repository (not the virtualenv, caches or the models)."""
    for top in sorted(ROOT.iterdir()):
        if top.name.startswith(".") or top.name in ("models", "venv", "build", "dist"):
            continue
        yield from [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []


def test_only_tests_and_benchmarks_import_the_test_support() -> None:
    # The rules above cover the packages; this covers every other file (scripts, ...): what the
    # wheel, which leaves the test support out, or the repository's tooling runs never needs it.
    known = set(GRAPH)
    users, bad = [], []
    for path in _repository_sources():
        rel = path.relative_to(ROOT)
        if any(_in(d, TESTING) for d in imports_of(path.read_text(), module_name(path), known)):
            allowed = rel.parts[0] in ("tests", "bench") or _in(module_name(path), TESTING)
            (users if allowed else bad).append(rel.as_posix())
    assert bad == []
    assert len(users) > 5  # the scan sees the tests and benchmarks that use it


def test_the_graph_sees_the_whole_tree() -> None:
    # Each role exists and its known edges are seen, lazy ones included: a rule over an
    # empty or blind graph would pass for nothing.
    assert {"batchvision.core.settings", "batchvision.server.keys", "batchvision.client.http"} <= GRAPH.keys()
    assert "batchvision.cli.main" in GRAPH and "workers.keras_model" in GRAPH and "api.jobs" in GRAPH
    assert "tensorflow" in GRAPH["workers.keras_model"]
    assert "batchvision.cli.local" in GRAPH["batchvision.cli.main"]  # imported inside a function
    assert "urllib3.connectionpool" in GRAPH["batchvision.client.retry"]  # imported for type checking


def test_the_parser_catches_lazy_and_type_only_imports() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import flask\n"
        "def f():\n    import tensorflow as tf\n    from batchvision.server import keys\n"
        "from . import sibling\n"
    )
    known = {"batchvision.server.keys", "batchvision.core.sibling"}
    found = set(imports_of(src, "batchvision.core.x", known))
    assert {"flask", "tensorflow", "batchvision.server.keys", "batchvision.core.sibling"} <= found
    bad = {"batchvision.core.x": found}
    assert any(
        RULES["core imports nothing of the project"]("batchvision.core.x", d)
        for d in bad["batchvision.core.x"]
    )
