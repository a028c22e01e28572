"""Rules of the test suite itself, read from the source with ``ast``: no test module imports
another test module or a conftest (shared helpers are fixtures), and no ``__init__.py`` makes
the test folders packages (the suite runs with ``--import-mode=importlib``)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _imported(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


def _is_test_code(module: str) -> bool:
    head = module.split(".")[0]
    return (
        module.startswith(".")
        or head in {"tests", "conftest", "unit", "integration"}
        or (head.startswith("test_"))
    )


def test_no_test_module_imports_test_code() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 10  # the rule sees the suite
    bad = [f"{p.relative_to(TESTS)} imports {m}" for p in files for m in _imported(p) if _is_test_code(m)]
    assert bad == []


def test_the_rule_catches_imports_of_test_code(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text(
        "from tests.conftest import ARTIFACTS\nimport conftest\nfrom .helpers import f\n"
        "def g():\n    from test_imaging import h\nimport os\n"
    )
    assert [m for m in _imported(src) if _is_test_code(m)] == [
        "tests.conftest",
        "conftest",
        ".helpers",
        "test_imaging",
    ]


def test_test_folders_are_not_packages() -> None:
    assert sorted(p.relative_to(TESTS).as_posix() for p in TESTS.rglob("__init__.py")) == []
