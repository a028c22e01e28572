"""``batchvision models`` and ``batchvision reload``: the models the workers serve."""

from __future__ import annotations

import argparse
import json
from typing import Any

from batchvision.cli.commands import EXIT_OK, AddFn, client_of, client_options, guarded
from batchvision.core.model_documents import ModelInfo


def cmd_models(args: argparse.Namespace) -> int:
    """List the models: versions (and why one was refused), the live one, input size, classes,
    and how many workers serve each."""
    listing = client_of(args).models()
    if args.json:
        print(json.dumps(listing.model_dump(mode="json"), indent=2))
        return EXIT_OK
    for m in listing.models:
        print(describe(m))
        for v in m.versions:
            why = f": {v.error}" if v.error else ""
            if v.replacement_error:
                why = f" (its new files were refused, the old ones stay live: {v.replacement_error})"
            print(f"  version {v.version}: {v.status}{why}")
    return EXIT_OK


def describe(m: ModelInfo) -> str:
    """One line for a model: its live version (and whether an operator pinned it), input size,
    classes, and its workers by the version they have live."""
    default = " (default)" if m.default else ""
    pinned = ""
    if m.pinned_live_version is not None:
        to = "" if m.pinned_live_version == m.live_version else f" to {m.pinned_live_version}, not live yet"
        pinned = f" (pinned{to}: `reload --version latest` unpins)"
    size = "x".join(str(v) for v in m.input_size or []) or "?"
    by_version = ", ".join(
        f"{n} on version {v}" if v != "none" else f"{n} with none live"
        for v, n in sorted(m.workers_by_version.items(), key=lambda kv: (len(kv[0]), kv[0]))
    )
    workers = f"{m.workers} worker{'' if m.workers == 1 else 's'}" + (
        f" ({by_version})" if by_version else ""
    )
    live = f"live version {m.live_version}{pinned}"
    return f"{m.name}{default}: {live}, input {size}, {m.classes} classes, {workers}"


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the workers serving a model to load its new version, or make a version live
    (``--version N``; ``--version latest`` undoes that). Needs an admin key."""
    version: int | str | None = args.version
    accepted = client_of(args).reload_model(args.name, version)
    print(json.dumps(accepted.model_dump(mode="json"), indent=2))
    return EXIT_OK


def cmd_forget_model(args: argparse.Namespace) -> int:
    """Remove a model that no worker serves any more from the registry. Needs an admin key."""
    client_of(args).forget_model(args.name)
    print(f"model {args.name} forgotten: new jobs naming it are refused")
    return EXIT_OK


def register(sub: Any, add: AddFn) -> None:
    """Add ``models`` and ``reload`` to the ``batchvision`` parser."""

    p = client_options(
        add("models", guarded(cmd_models, reads=True), "list the models, their versions and workers")
    )
    p.add_argument("--json", action="store_true", help="print the API's document")
    p = client_options(
        add("reload", guarded(cmd_reload), "load a model's new version, or make a version live")
    )
    p.add_argument("name")
    p.add_argument("--version", type=_version, help="a version number to make live, or `latest`")
    p = client_options(
        add("forget-model", guarded(cmd_forget_model), "remove a model no worker serves from the registry")
    )
    p.add_argument("name")


def _version(text: str) -> int | str:
    """``--version``: a version number (1 or more), or ``latest``; argparse says what is wrong."""
    if text == "latest":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a version number (1, 2, ...) nor 'latest'")
    return int(text)
