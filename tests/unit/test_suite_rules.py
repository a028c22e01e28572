"""Rules of the test suite itself, read from the source with ``ast``: no test module imports
another test module or a conftest (shared helpers are fixtures), no ``__init__.py`` makes
the test folders packages (the suite runs with ``--import-mode=importlib``), and every wait is
the ``wait_until`` fixture (``tests/conftest.py``): no hand-rolled polling loop, no fixed sleep
followed by an assertion (a negative check waits for a positive signal instead)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
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


# -- waiting -------------------------------------------------------------------------------------

#: The one polling helper, which the rules below would otherwise flag.
HELPER = ("conftest.py", "_wait_until")
#: Modules being rewritten on another branch, with how many waits they may still hand-roll
#: (at most); each entry goes once its module uses ``wait_until``.
PENDING = {
    "integration/test_model_registry.py": 2,
    "unit/test_model_manager.py": 1,
}


def _is_call(node: ast.AST, module: str, names: set[str]) -> bool:
    """``module.name(...)`` or a bare ``name(...)`` for a ``name`` in ``names``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr in names and isinstance(func.value, ast.Name) and func.value.id == module
    return isinstance(func, ast.Name) and func.id in names - {"time"}


def _clock(node: ast.AST) -> bool:
    return _is_call(node, "time", {"monotonic", "time", "perf_counter"})


def _sleep(node: ast.AST) -> bool:
    return _is_call(node, "time", {"sleep"})


def _polls(loop: ast.While) -> bool:
    """A ``while`` loop that sleeps while it waits for something: with a clock (a deadline), for
    ever (``while True``), or until a condition that calls something or reads what the loop
    does not change itself (another thread's, another process's state). A loop counting its
    own progress (``while sent < 100: ...; sent += 1; sleep``) only paces itself."""
    body = [n for stmt in loop.body for n in ast.walk(stmt)]
    if not any(_sleep(n) for n in body):
        return False
    test = list(ast.walk(loop.test))
    assigned = {n.id for n in body if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    read = {n.id for n in test if isinstance(n, ast.Name)}
    return (
        any(_clock(n) for n in [*test, *body])
        or isinstance(loop.test, ast.Constant)
        or any(isinstance(n, ast.Call) for n in test)
        or not read <= assigned
    )


def hand_rolled_waits(source: str, helper: str = "") -> Iterator[str]:
    """Where ``source`` waits by hand: a deadline (``clock() + timeout``), a polling loop, or a
    fixed sleep whose next statement (after at most two assignments) is an assertion."""
    tree = ast.parse(source)
    skip = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and f.name == helper
        for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.BinOp):
            if isinstance(node.value.op, ast.Add) and (_clock(node.value.left) or _clock(node.value.right)):
                yield f"line {node.lineno}: a deadline"
        if isinstance(node, ast.While) and _polls(node):
            yield f"line {node.lineno}: a polling loop"
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            for i, stmt in enumerate(stmts):
                if isinstance(stmt, ast.Expr) and _sleep(stmt.value):
                    after = stmts[i + 1 :]
                    j = 0
                    while j < min(2, len(after)) and isinstance(after[j], ast.Assign | ast.AnnAssign):
                        j += 1
                    if j < len(after) and isinstance(after[j], ast.Assert):
                        yield f"line {stmt.lineno}: a fixed sleep, then an assertion"


def test_every_wait_is_the_wait_until_fixture() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS).as_posix()
        helper = HELPER[1] if rel == HELPER[0] else ""
        waits = list(hand_rolled_waits(path.read_text(), helper))
        if len(waits) > PENDING.get(rel, 0):
            found[rel] = waits
    assert found == {}, "wait with the wait_until fixture (tests/conftest.py) instead"


def test_the_rule_catches_hand_rolled_waits() -> None:
    caught = """
import time
from time import monotonic, sleep

def deadline_loop(ready):
    deadline = time.monotonic() + 10
    while not ready():
        assert time.monotonic() < deadline
        time.sleep(0.1)

def forever(ready):
    while True:
        if ready():
            break
        sleep(0.1)

def another_thread(servers):
    while not servers:
        time.sleep(0.01)

def nothing_more_comes(got):
    time.sleep(2.0)  # nothing more comes
    n = len(got)
    assert n == 1
"""
    assert sorted(w.split(": ")[1] for w in hand_rolled_waits(caught)) == [
        "a deadline",
        "a fixed sleep, then an assertion",
        "a polling loop",
        "a polling loop",
        "a polling loop",
    ]
    fine = """
import time

def paced(submit):
    sent = 0
    while sent < 100:
        submit()
        sent += 1
        time.sleep(0.001)

def fault_lasts(net, host, check):
    net.cut(host)
    assert check(host)
    time.sleep(5)  # the cut lasts 5 s
    net.heal(host)

def measured(run):
    start = time.monotonic()
    run()
    return time.monotonic() - start
"""
    assert list(hand_rolled_waits(fine)) == []
