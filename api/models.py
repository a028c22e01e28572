"""``/v1/models``: the models the workers serve, their versions, and reloads.

The API holds no model: it reads the registry the workers write
(:mod:`batchvision.server.registry`). A reload is for admin keys only
(``BATCHVISION_ADMIN_KEYS``); it moves the live pointer when it names a version and asks the
workers serving the model to look again, then answers ``202`` at once: ``GET /v1/models`` shows
the outcome (the live version, or a refused version with its reason).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, request

from api import contract as c
from api.auth import Forbidden, digest, parse_keys, presented_key
from api.services import Services, services
from batchvision.core import documents as d
from batchvision.core import model_documents as md
from batchvision.core.errors import Conflict, NotFound, Unauthorized, UnsupportedMediaType
from batchvision.core.model_refs import InvalidOption
from batchvision.core.settings import Settings
from batchvision.server.registry import FAILED
from batchvision.server.routing import default_model, model_queues

bp = Blueprint("models", __name__, url_prefix="/v1")


def accepted_keys(settings: Settings) -> str:
    """The keys the API accepts: the API keys and, when there are any, the admin keys too (an
    admin key is an API key that may also reload models)."""
    api_keys = settings.api_keys.get_secret_value()
    admin_keys = settings.admin_keys.get_secret_value()
    if not parse_keys(api_keys) or not parse_keys(admin_keys):
        return api_keys
    return f"{api_keys},{admin_keys}"


def require_admin(settings: Settings) -> None:
    """``401`` without a key, ``403`` with a key that is not an admin key (or with no admin
    keys configured: then reloads come from new version folders only)."""
    admins = parse_keys(settings.admin_keys.get_secret_value())
    if not admins:
        raise Forbidden(
            "managing models over the API is off: set BATCHVISION_ADMIN_KEYS (new version "
            "folders are still picked up by the workers)",
            code="admin_keys_not_configured",
        )
    key = presented_key()
    if key is None:
        raise Unauthorized(
            "an admin key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'",
            code="admin_key_required",
        )
    if digest(key) not in admins:
        raise Forbidden("this key is not an admin key (BATCHVISION_ADMIN_KEYS)", code="not_an_admin_key")


def queues_of(svc: Services) -> Callable[[], dict[str, tuple[str, ...]]]:
    """The queues of every model the workers announced, for the ``batchvision_queue_tasks``
    gauge (one series per model)."""

    def queues() -> dict[str, tuple[str, ...]]:
        names = {default_model(svc.settings), *svc.models.model_names()}
        return dict(model_queues(svc.settings, sorted(names)))

    return queues


@bp.get("/models")
@c.contract(
    summary="The models: versions, the live one, input size, classes, and the workers serving each",
    query=d.NoQuery,
    responses={200: c.Response("Every model the workers announced", md.ModelList)},
    tags=("models",),
)
def list_models() -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    default = default_model(svc.settings)
    return {"default": default, "models": svc.models.listing(default)}


@bp.post("/models/<name>/reload")
@c.contract(
    summary="Load a model's new version, or point its live version at one (admin key only)",
    description="Without a body (or `{}`) the workers serving the model look for new versions; "
    '`{"version": N}` makes version N live and keeps it live (a rollback), `{"version": '
    '"latest"}` returns to the newest version that loads. Loading happens in the background: '
    "in-flight batches finish on the old version, and a version that fails to load or whose "
    "output does not match its labels is refused with the reason (`GET /v1/models`).",
    query=d.NoQuery,
    body={"application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}},
    body_required=False,
    schema_refs=(md.ReloadRequest,),
    responses={
        202: c.Response("Requested: the workers load in the background", md.ReloadAccepted),
        403: c.Response("Not an admin key, or no admin keys configured", d.ErrorDocument),
        404: c.Response("No such model", d.ErrorDocument),
        415: c.Response("A body that is not JSON", d.ErrorDocument),
        422: c.Response(
            "The model has no such version (the allowed ones are named)",
            d.ErrorDocument,
        ),
    },
    tags=("models",),
)
def reload_model(name: str) -> tuple[dict[str, Any], int]:
    svc = services()
    c.query(d.NoQuery)
    body = _reload_body()
    require_admin(svc.settings)
    known = svc.models.raw(fresh=True)
    if name not in known:
        names = ", ".join(sorted(known)) or "none yet"
        raise NotFound(f"no model {name[:80]!r}: the workers serve {names}", code="model_not_found")
    version = body.version if isinstance(body.version, int) else None
    versions = known[name]["versions"]
    if version is not None and version not in versions:
        allowed = [str(v) for v in sorted(versions)]
        raise InvalidOption(
            f"model {name!r} has no version {version}; allowed version: {', '.join(allowed)}",
            details=[{"in": "body", "field": "version", "value": version, "allowed": allowed}],
        )
    warning = None
    if version is not None and versions[version].get("status") == FAILED:
        # Not refused: its files may have been mended since (the workers try a pinned version
        # again), but said, or the model would seem to stay on its old version without a word.
        why = versions[version].get("error") or "it failed to load"
        warning = (
            f"version {version} was refused when last tried ({why}); the workers try it again, and "
            "the live version stays until it loads"
        )
    req = svc.models.request_reload(name, version, latest=body.version == "latest")
    doc = {
        "model": name,
        "request_id": req["id"],
        "version": version,
        "latest": req["latest"],
        "workers": req["receivers"],
    }
    if warning is not None:
        doc["warning"] = warning
    return doc, 202


@bp.delete("/models/<name>")
@c.contract(
    summary="Forget a model that no worker serves any more (admin key only)",
    description="Removes the model from the registry: `GET /v1/models` no longer lists it and a "
    "new job naming it is refused (`422 invalid_option`) instead of waiting for a worker that "
    "will not come. Refused while a worker serves it (stop those workers first: a worker that "
    "starts announces its models again) and for the API's default model. Jobs already queued "
    "for it stay queued: cancel or delete them.",
    query=d.NoQuery,
    responses={
        200: c.Response("The model is forgotten", md.ModelForgotten),
        403: c.Response("Not an admin key, or no admin keys configured", d.ErrorDocument),
        404: c.Response("No such model", d.ErrorDocument),
        409: c.Response(
            "A worker serves the model now (`model_served`), or it is the API's default model "
            "(`default_model`)",
            d.ErrorDocument,
        ),
    },
    tags=("models",),
)
def forget_model(name: str) -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    require_admin(svc.settings)
    known = svc.models.raw(fresh=True)
    if name not in known:
        names = ", ".join(sorted(known)) or "none yet"
        raise NotFound(f"no model {name[:80]!r}: the registry has {names}", code="model_not_found")
    if name == default_model(svc.settings):
        raise Conflict(
            f"model {name!r} is the API's default model (BATCHVISION_MODEL): jobs that name no "
            "model go to it",
            code="default_model",
        )
    serving = svc.models.serving(name)
    if serving:
        raise Conflict(
            f"{serving} worker{'s' if serving > 1 else ''} serve{'' if serving > 1 else 's'} model "
            f"{name!r} now: stop {'them' if serving > 1 else 'it'} first (a worker announces its "
            "models again when it starts)",
            code="model_served",
        )
    svc.models.forget(name)
    return {"model": name, "forgotten": True}


def _reload_body() -> md.ReloadRequest:
    if not request.get_data(cache=True):
        return md.ReloadRequest(version=None)
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json, not {request.mimetype or '(none)'}")
    return c.json_body(md.ReloadRequest)
