"""The documentation site builds strictly, and what it (and the README) claims about the code
holds: every environment variable, route, metric, CLI command and flag it names exists, the
exit codes are the CLI's, and the generated references come from the code."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from batchvision.cli.commands import ExitCode
from batchvision.cli.main import build_parser
from batchvision.core.settings import CLIENT_VARIABLES, PREFIX, Settings, env_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
TEXTS = [README, *PAGES]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@functools.cache
def hooks() -> ModuleType:
    """docs/hooks/reference.py, the MkDocs hook that generates the reference pages."""
    spec = importlib.util.spec_from_file_location("docs_reference_hooks", DOCS / "hooks" / "reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav or a failing
    generator fails the build (and so `make test`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["NO_MKDOCS_2_WARNING"] = "1"
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = _read(site / "reference" / "configuration" / "index.html")
    assert all(name in config for name, _, _ in env_table())
    assert (site / "openapi.json").is_file()
    cli = _read(site / "reference" / "cli" / "index.html")
    assert "batchvision worker-health" in cli and "--exit-after-demo" in cli


def test_every_page_is_in_the_nav() -> None:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may carry !!python tags of extensions: read them as plain strings.
    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    nav = yaml.load(_read(ROOT / "mkdocs.yml"), Loader=_Loader)["nav"]

    def pages(entry: object) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for e in entry for p in pages(e)]
        if isinstance(entry, dict):
            return [p for v in entry.values() for p in pages(v)]
        return []

    listed = set(pages(nav))
    on_disk = {str(p.relative_to(DOCS)) for p in PAGES}
    assert listed == on_disk
    # The pages other helpers own exist and are listed.
    assert {"deploy/compose.md", "internals/worker.md"} <= listed


def test_configuration_reference_is_generated_from_settings() -> None:
    page = hooks().render(_read(DOCS / "reference" / "configuration.md"))
    rows = dict(re.findall(r"^\| `(BATCHVISION_[A-Z0-9_]+)` \| `([^`]*)` \|", page, re.M))
    assert rows == {name: default for name, default, _ in env_table()}
    assert "<!-- generated" not in page


def test_api_reference_lists_every_route_of_the_openapi_document() -> None:
    doc = hooks().openapi_document()
    page = hooks().render(_read(DOCS / "reference" / "api.md"))
    for path, ops in doc["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}`" in page, (method, path)
    for schema in doc["components"]["schemas"]:
        assert f"### {schema}\n" in page, schema


# -- claims in the text -----------------------------------------------------------------------


def _code_spans(text: str) -> list[str]:
    """Inline code and the lines of fenced code blocks."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return lines + inline


def test_no_tracker_numbers_in_the_docs() -> None:
    for path in TEXTS:
        found = re.findall(r"\bissue \d+|\(#\d+\)", _read(path), re.I)
        assert not found, (path.name, found)


def test_documented_environment_variables_are_settings() -> None:
    known = {PREFIX + name.upper() for name in Settings.model_fields} | CLIENT_VARIABLES
    for path in TEXTS:
        named = set(re.findall(r"\bBATCHVISION_[A-Z0-9_]*[A-Z0-9]\b", _read(path)))
        # `BATCHVISION_*`-style short names (`RESULT_TTL_S`) are written with the prefix.
        assert named <= known, (path.name, sorted(named - known))


@functools.cache
def _routes() -> list[tuple[str, re.Pattern[str]]]:
    from api import create_app

    app = create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))
    out = []
    for rule in app.url_map.iter_rules():
        pattern = re.sub(r"<[^>]+>", "[^/]+", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            out.append((method, re.compile(pattern + "$")))
    return out


def test_documented_routes_exist() -> None:
    checked = 0
    for path in TEXTS:
        # (A request line with " HTTP/1.1" is what a webhook receiver gets, not an API route.)
        for method, route in re.findall(
            r"\b(GET|POST|PUT|PATCH|DELETE) (/[\w/<>{}.-]*)(?![\w/<>{}.-]| HTTP/)", _read(path)
        ):
            concrete = re.sub(r"[<{][^>}]+[>}]", "x", route)
            assert any(m == method and p.match(concrete) for m, p in _routes()), (path.name, method, route)
            checked += 1
    assert checked > 30


def _exported_metrics() -> set[str]:
    from prometheus_client.registry import REGISTRY

    import api.metrics
    import workers.metrics  # importing registers the worker's metrics

    names: set[str] = set(api.metrics.StoreCollector.NAMES)
    # Registered only where NVML shows a GPU: none here.
    names |= set(workers.metrics.GpuCollector.NAMES)
    for family in REGISTRY.collect():
        if family.name.startswith("batchvision_"):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    return names


def test_documented_metrics_are_exported() -> None:
    exported = _exported_metrics()
    histogram_parts = ("_bucket", "_sum", "_count")
    checked = 0
    for path in TEXTS:
        for name in re.findall(r"`(batchvision_[a-z_]+)", _read(path)):
            base = next((name[: -len(p)] for p in histogram_parts if name.endswith(p)), name)
            assert name in exported or base in exported, (path.name, name)
            checked += 1
    assert checked >= 17


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_documented_csv_header_is_the_one_written() -> None:
    from batchvision.core.results import CSV_COLUMNS

    guide = (DOCS / "guides" / "http-api.md").read_text()
    assert f"CSV columns `{','.join(CSV_COLUMNS)}`" in guide


def test_documented_cli_commands_and_flags_exist() -> None:
    commands = _subcommands()
    checked = 0
    for path in TEXTS:
        for span in _code_spans(_read(path)):
            # A command: at the start of a line or span (after a prompt), or after ; && | (
            for m in re.finditer(
                r"(?:^\s*(?:\$\s*)?|[;&|(]\s*)batchvision ([a-z][a-z-]*)((?: [^#|;&]*)?)", span
            ):
                command, rest = m.group(1), m.group(2)
                if command in ("worker", "api") and rest.startswith(("@", ".", ":")):
                    continue
                assert command in commands, (path.name, span)
                options = {o for a in commands[command]._actions for o in a.option_strings}
                try:
                    words = shlex.split(rest.replace("[", " ").replace("]", " ").replace("|", " "))
                except ValueError:
                    words = rest.split()
                for word in words:
                    flag = word.split("=", 1)[0]
                    if re.fullmatch(r"--?[a-z][a-z0-9-]*", flag):
                        assert flag in options, (path.name, command, flag, span)
                        checked += 1
    assert checked > 20


def test_documented_exit_codes_are_the_cli_s() -> None:
    page = _read(DOCS / "guides" / "cli.md")
    table = page.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {
        code: meaning
        for codes, meaning in re.findall(r"^\| (`\d+`(?: / `\d+`)*) \| (.+) \|$", table, re.M)
        for code in map(int, re.findall(r"\d+", codes))
    }
    from batchvision.cli.main import EXIT_CONFIG
    from batchvision.cli.runner import FATAL_EXIT_CODES

    # The client commands' codes, `up`'s 1, a refused configuration and the signals that stop
    # `up` (128 + SIGINT, SIGTERM, SIGHUP).
    signals = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert set(rows) == {int(c) for c in ExitCode} | {1, EXIT_CONFIG} | signals
    assert EXIT_CONFIG == ExitCode.USAGE and FATAL_EXIT_CODES >= {EXIT_CONFIG}
    assert "submit" in rows[ExitCode.SUBMIT_FAILED] and "status" in rows[ExitCode.REQUEST_FAILED]
    assert "--wait" in rows[ExitCode.SOME_FAILED]


# -- the README, the front page ----------------------------------------------------------------


def test_readme_is_a_short_front_page_whose_links_resolve() -> None:
    text = _read(README)
    assert len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) >= 8
    for link in local:
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md"])
def test_license_and_changelog(name: str) -> None:
    text = _read(ROOT / name)
    if name == "LICENSE":
        assert "Apache License" in text and "Version 2.0, January 2004" in text
        import tomllib

        assert tomllib.loads(_read(ROOT / "pyproject.toml"))["project"]["license"] == {"text": "Apache-2.0"}
    else:
        assert re.search(r"^## \[?\d+\.\d+\.\d+", text, re.M)
