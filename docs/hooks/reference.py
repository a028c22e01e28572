"""MkDocs hook: the reference pages are generated from the code at every build, never kept by hand.

A page asks for a generated part with a marker line, replaced when the site is built:

- ``<!-- generated: settings -->``: every setting of ``batchvision.core.settings.Settings``, its
  environment variable, default and description (``env_table()``);
- ``<!-- generated: cli -->``: every ``batchvision`` subcommand with its arguments and options,
  from the command's own argparse parser;
- ``<!-- generated: openapi -->``: every route of the API's OpenAPI document
  (``api.contract.openapi``), with parameters, request bodies, responses and schemas.

The OpenAPI document itself is part of the site as ``openapi.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z]+) -->$", re.M)


def _cell(text: object) -> str:
    """A value fit for one markdown table cell (docstring markup made markdown, one line)."""
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", str(text))  # :mod:`x` -> `x`
    text = text.replace("``", "`")
    return re.sub(r"\s+", " ", text.replace("|", "\\|")).strip()


def _sentence(text: str, more: str) -> str:
    """``text`` followed by the sentence ``more``."""
    if not text:
        return more
    return text + ("" if text.endswith(".") else ".") + " " + more


# -- settings ------------------------------------------------------------------------------------


def settings_markdown() -> str:
    from batchvision.core.settings import CLIENT_VARIABLES, env_table

    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, default, meaning in env_table():
        lines.append(f"| `{name}` | `{default}` | {_cell(meaning)} |")
    lines.append("")
    clients = ", ".join(f"`{v}`" for v in sorted(CLIENT_VARIABLES))
    lines.append(
        f"The client and the CLI read {clients} (the API's address and key) instead; they are no "
        "service setting."
    )
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(action: argparse.Action) -> str:
    text = _cell(action.help or "")
    if action.choices is not None:
        text = _sentence(text, "One of " + ", ".join(f"`{c}`" for c in action.choices) + ".")
    default = action.default
    if default not in (None, False, argparse.SUPPRESS) and "default" not in text.lower():
        text = _sentence(text, f"Default `{default}`.")
    return text or " "


def cli_markdown() -> str:
    from batchvision.cli.main import build_parser

    out: list[str] = []
    for name, sub in _subparsers(build_parser()).items():
        out.append(f"### `batchvision {name}`\n")
        out.append(_cell(sub.description or "") + "\n")
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                flags = ", ".join(f"`{o}`" for o in action.option_strings)
                if action.nargs != 0:
                    flags += f" `{action.metavar or action.dest.upper()}`"
            else:
                flags = f"`{action.dest}`" + (" (any number)" if action.nargs in ("*", "+") else "")
            rows.append(f"| {flags} | {_help(action)} |")
        if rows:
            out += ["| Argument | Meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


# -- OpenAPI -------------------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    from api import contract, create_app
    from batchvision.core.settings import Settings

    # Nothing connects until a request needs Redis: the URL map and the document need none.
    return contract.openapi(create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0")))


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if isinstance(kind, list):
        return " or ".join(kind)
    return str(kind)


def _limits(schema: dict[str, Any]) -> str:
    words = {
        "minimum": "≥",
        "maximum": "≤",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
        "minLength": "length ≥",
        "maxLength": "length ≤",
    }
    parts = [f"{w} {schema[k]}" for k, w in words.items() if k in schema]
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    if "default" in schema and schema["default"] is not None:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    return "; ".join(parts)


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method.upper(), op


def openapi_markdown() -> str:
    doc = openapi_document()
    out = [f"OpenAPI {doc['openapi']}, version {doc['info']['version']}: {doc['info']['description']}\n"]
    out.append("| Route | Summary |\n|---|---|")
    for path, method, op in _operations(doc):
        out.append(f"| [`{method} {path}`](#{op['operationId'].lower()}) | {_cell(op['summary'])} |")
    out.append("")
    for path, method, op in _operations(doc):
        out.append(f"### `{method} {path}` {{ #{op['operationId'].lower()} }}\n")
        out.append(_cell(op["summary"]) + "\n")
        if op.get("description"):
            out.append(op["description"] + "\n")
        params = op.get("parameters", [])
        if params:
            out += ["| Parameter | In | Type | Meaning |", "|---|---|---|---|"]
            for p in params:
                schema = p.get("schema", {})
                meaning = " ".join(x for x in (p.get("description", ""), _limits(schema)) if x)
                required = " (required)" if p.get("required") else ""
                out.append(f"| `{p['name']}`{required} | {p['in']} | {_type(schema)} | {_cell(meaning)} |")
            out.append("")
        body = op.get("requestBody")
        if body:
            kinds = ", ".join(
                f"`{ct}`" + (f" ({_type(c['schema'])})" if "$ref" in c.get("schema", {}) else "")
                for ct, c in body["content"].items()
            )
            out.append(f"Request body{' (required)' if body.get('required') else ''}: {kinds}\n")
        out += ["| Status | Meaning | Body |", "|---|---|---|"]
        for status, resp in op["responses"].items():
            bodies = ", ".join(
                f"`{ct}`" + (f" {_type(c['schema'])}" if "$ref" in c.get("schema", {}) else "")
                for ct, c in resp.get("content", {}).items()
            )
            out.append(f"| `{status}` | {_cell(resp['description'])} | {bodies or '(none)'} |")
        out.append("")
    out.append("## Schemas\n")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"### {name}\n")
        if schema.get("description"):
            out.append(_cell(schema["description"]) + "\n")
        if "enum" in schema:
            out.append("One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".\n")
        props = schema.get("properties", {})
        if props:
            fields_required = set(schema.get("required", []))
            out += ["| Field | Type | Meaning |", "|---|---|---|"]
            for field, sub in props.items():
                meaning = " ".join(x for x in (sub.get("description", ""), _limits(sub)) if x)
                mark = " (required)" if field in fields_required else ""
                out.append(f"| `{field}`{mark} | {_type(sub)} | {_cell(meaning)} |")
            out.append("")
    return "\n".join(out)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_markdown,
    "cli": cli_markdown,
    "openapi": openapi_markdown,
}


def render(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated part (an unknown marker fails)."""

    def one(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise ValueError(f"unknown generated part {name!r}: one of {', '.join(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(one, markdown)


# -- MkDocs events -------------------------------------------------------------------------------


def on_page_markdown(markdown: str, **_: Any) -> str:
    return render(markdown)


def on_files(files: Any, config: Any, **_: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "openapi.json", content=json.dumps(openapi_document(), indent=2)))
    return files
