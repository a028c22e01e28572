"""The API contract, generated from the code: every route declares its parameters, bodies and
responses with :func:`contract`, and :func:`openapi` builds the OpenAPI 3.1 document from
those declarations, the pydantic models of :mod:`batchvision.core.documents` and Flask's URL
map. A route without a declaration fails the tests; so does a status code a route answers
without declaring it (schemathesis checks every response against this document).

:func:`query` and :func:`json_body` validate inputs with the same models and turn a pydantic
error into a ``400`` that names each bad field, its value and what is allowed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Flask, request
from pydantic import BaseModel, ValidationError

from batchvision import __version__
from batchvision.core import documents as d
from batchvision.core.errors import BadRequest

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

#: Status codes every ``/v1`` route may answer, whatever it does.
V1_COMMON = {
    400: "Invalid parameter, header or body (the error names the field)",
    401: "API key missing or invalid (when keys are configured)",
    429: "Rate limit or queue limit reached; retry after `Retry-After` seconds",
    503: "Redis or the broker is unreachable; retry after `Retry-After` seconds",
}
#: What gunicorn answers itself before a request reaches the app (request line or headers over
#: its limits), as the same error document (``api/gunicorn_conf.py``).
SERVER_COMMON = {
    414: "Request line too long (`request_line_too_long`; answered by gunicorn)",
    431: "Request headers too large (`headers_too_large`; answered by gunicorn)",
}
#: What a route that reads a body answers when its client stops sending it (``api/slow_clients.py``).
BODY_TIMEOUT = (
    "The client sent no byte of the body for `BATCHVISION_API_BODY_TIMEOUT_S` (`body_timeout`); "
    "the connection is closed"
)
_JSON = "application/json"
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream")


@dataclass
class Response:
    """One documented response: a model (JSON), or a content type with a plain schema."""

    description: str
    model: type[BaseModel] | None = None
    content_type: str = _JSON
    schema: dict[str, Any] | None = None
    headers: tuple[str, ...] = ()
    links: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)  # more content types


@dataclass
class Contract:
    """What a route accepts and answers."""

    summary: str
    responses: dict[int, Response]
    query: type[BaseModel] | None = None
    body: dict[str, dict[str, Any]] | None = None  # content type -> schema (JSON models as refs)
    body_required: bool = False
    headers: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    v1: bool = True
    description: str = ""
    schema_refs: tuple[type[BaseModel], ...] = ()


def contract(**kwargs: Any) -> Callable[[F], F]:
    """Declare a view's contract (see :class:`Contract`)."""
    spec = Contract(**kwargs)

    def mark(view: F) -> F:
        view.__contract__ = spec  # type: ignore[attr-defined]
        return view

    return mark


def undocumented(view: F) -> F:
    """Mark a route that is deliberately not in the API document (static files, the docs page)."""
    view.__contract__ = None  # type: ignore[attr-defined]
    return view


# -- validation -----------------------------------------------------------------------------


#: A location part pydantic adds for a member of a union or a validated type, not a field name.
_UNION_MEMBER = re.compile(r"^(?:function-[a-z]+\[.*\]|constrained-[a-z]+|literal\[.*\])$")


def _problems(exc: ValidationError, where: str) -> tuple[str, list[dict[str, Any]]]:
    details = []
    for err in exc.errors(include_url=False):
        parts = [str(p) for p in err["loc"] if not _UNION_MEMBER.match(str(p))]
        name = ".".join(parts) or "(body)"
        item = {"in": where, "field": name, "message": err["msg"]}
        if err["type"] != "missing":
            item["value"] = err.get("input")
        details.append(item)
    first = details[0]
    shown = f" (got {first['value']!r})" if "value" in first else ""
    return f"{where} {first['field']!r}: {first['message']}{shown}", details


def query(model: type[M]) -> M:
    """The request's query parameters as ``model``; ``400 bad_parameter`` naming each problem."""
    args = request.args
    repeated = [k for k in args if len(args.getlist(k)) > 1]
    if repeated:
        raise BadRequest(f"query parameter {repeated[0]!r} is given more than once", code="bad_parameter")
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        message, details = _problems(exc, "query parameter")
        allowed = ", ".join(model.model_fields) or "none"
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            message += f"; this route takes: {allowed}"
        else:
            message += _what_is_allowed(model, details[0]["field"])
        raise BadRequest(message, code="bad_parameter", details=details) from exc


def _what_is_allowed(model: type[BaseModel], field: str) -> str:
    """``"; <field>: <its description>"`` for a top-level field that has one: what a good value
    is, after a message that says what was wrong."""
    top = field.split(".")[0]
    info = model.model_fields.get(top)
    return f"; {top}: {info.description}" if info is not None and info.description else ""


def json_body(model: type[M], others: str = "") -> M:
    """The request's JSON body as ``model``; ``400 bad_body`` naming each problem and what the
    body may hold (``others``: the route's other JSON bodies, said after the fields of this one)."""
    raw = request.get_json(silent=True)
    if raw is None:
        raise BadRequest("the body is not valid JSON", code="bad_body")
    fields = ", ".join(model.model_fields) or "none"
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        if not isinstance(raw, dict):  # pydantic would name the model's class
            raise BadRequest(
                f"the body must be a JSON object, not {type(raw).__name__}: its fields are {fields}{others}",
                code="bad_body",
                details=[{"in": "body", "field": "(body)", "message": "not a JSON object"}],
            ) from exc
        message, details = _problems(exc, "body field")
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):
            message += f"; this body takes: {fields}{others}"
        else:
            message += _what_is_allowed(model, details[0]["field"])
        raise BadRequest(message, code="bad_body", details=details) from exc


def idempotency_key() -> str | None:
    """The ``Idempotency-Key`` header, checked: 1-255 visible ASCII characters."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not d.IDEMPOTENCY_KEY_RE.match(key):
        raise BadRequest(
            "header 'Idempotency-Key' must be 1 to 255 visible ASCII characters (no spaces)",
            code="bad_header",
            details=[{"in": "header", "field": "Idempotency-Key", "value": key[:300]}],
        )
    return key


def fingerprint() -> str:
    """A digest of what the request asks for (route, query, content type, body), so an
    ``Idempotency-Key`` reused for a different request is refused instead of replayed. Multipart
    bodies are hashed by part (name, filename, content), not by bytes: a client that rebuilds a
    retried request gets a new boundary but the same fingerprint."""
    h = hashlib.sha256()
    # The route too: the same key and body sent to POST /v1/jobs and to POST /v1/classify are
    # two requests, not a retry of one.
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    h.update(f"{request.method} {rule}\0".encode())
    h.update(repr(sorted(request.args.items(multi=True))).encode())
    h.update((request.mimetype or "").encode())
    if request.mimetype == "multipart/form-data":
        for name, part in request.files.items(multi=True):
            h.update(f"\0{name}\0{part.filename}\0".encode())
            h.update(
                hashlib.sha256(part.stream.getvalue() if hasattr(part.stream, "getvalue") else b"").digest()
            )
        h.update(repr(sorted(request.form.items(multi=True))).encode())
    else:
        h.update(request.get_data(cache=True))
    return h.hexdigest()


def job_id(value: str) -> str:
    """A path's job id, checked: ``400 bad_job_id`` unless 32 lowercase hex digits."""
    if not d.JOB_ID_RE.match(value):
        raise BadRequest(
            f"job id {value[:80]!r} is not a job id: expected 32 lowercase hex digits",
            code="bad_job_id",
            details=[{"in": "path", "field": "job_id", "value": value[:300]}],
        )
    return value


# -- the document -----------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _parameters(spec: Contract, path_args: list[str]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": d.JOB_ID_PATTERN}
            if name == "job_id"
            else {"type": "string"},
        }
        for name in path_args
    ]
    if spec.query is not None:
        schema = spec.query.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            prop.pop("title", None)
            description = prop.pop("description", None)
            param = {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", []),
                "schema": prop,
            }
            if description:
                param["description"] = description
            params.append(param)
    params.extend(spec.headers)
    return params


def _response(resp: Response) -> dict[str, Any]:
    out: dict[str, Any] = {"description": resp.description}
    if resp.model is not None:
        out["content"] = {resp.content_type: {"schema": _ref(resp.model)}}
    elif resp.schema is not None:
        out["content"] = {resp.content_type: {"schema": resp.schema}}
    if resp.alternatives:
        out.setdefault("content", {}).update({t: {"schema": s} for t, s in resp.alternatives.items()})
    if resp.headers:
        out["headers"] = {h: {"schema": {"type": "string"}} for h in resp.headers}
    if resp.links:
        out["links"] = resp.links
    return out


def operation_id(endpoint: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", endpoint)


def openapi(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, from their :func:`contract` declarations."""
    paths: dict[str, dict[str, Any]] = {}
    models: set[type[BaseModel]] = {d.ErrorDocument}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        spec = getattr(view, "__contract__", None)
        if spec is None:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        responses = dict(spec.responses)
        if spec.v1:
            for status, text in V1_COMMON.items():
                responses.setdefault(status, Response(text, d.ErrorDocument, headers=_retry(status)))
        for status, text in SERVER_COMMON.items():
            responses.setdefault(status, Response(text, d.ErrorDocument))
        if spec.body:
            responses.setdefault(408, Response(BODY_TIMEOUT, d.ErrorDocument))
        for resp in responses.values():
            if resp.model is not None:
                models.add(resp.model)
        models.update(spec.schema_refs)
        op: dict[str, Any] = {
            "operationId": operation_id(rule.endpoint),
            "summary": spec.summary,
            "responses": {str(k): _response(v) for k, v in sorted(responses.items())},
        }
        if spec.description:
            op["description"] = spec.description
        if spec.tags:
            op["tags"] = list(spec.tags)
        params = _parameters(spec, sorted(rule.arguments))
        if params:
            op["parameters"] = params
        if spec.body:
            op["requestBody"] = {"required": spec.body_required, "content": spec.body}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchvision",
            "version": __version__,
            "description": "Queue-based batch image classification. Errors are "
            '`{"error": {"code", "message", "details"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(models),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _retry(status: int) -> tuple[str, ...]:
    return ("Retry-After",) if status in (429, 503) else ()


def _schemas(models: set[type[BaseModel]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in sorted(models, key=lambda m: m.__name__):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def upload_body(*, archive: bool, json_model: type[BaseModel] | None = None) -> dict[str, dict[str, Any]]:
    """Request bodies of the upload routes: multipart files (or a zip part), raw images, zip."""
    binary = {"type": "string", "format": "binary"}
    multipart_props: dict[str, Any] = {"files": {"type": "array", "items": binary, "minItems": 1}}
    if archive:
        multipart_props["archive"] = binary
    # At least one of the parts (with only these properties allowed, minProperties says that
    # without an anyOf, which fuzzers misread).
    multipart = {
        "type": "object",
        "properties": multipart_props,
        "additionalProperties": False,
        "minProperties": 1,
    }
    body: dict[str, dict[str, Any]] = {
        "multipart/form-data": {"schema": multipart},
        **{t: {"schema": binary} for t in _IMAGE_TYPES},
    }
    if archive:
        body["application/zip"] = {"schema": binary}
    if json_model is not None:
        body[_JSON] = {"schema": _ref(json_model)}
    return body


IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "the same key (per API key) returns the job it created the first time",
    "schema": {"type": "string", "pattern": d.IDEMPOTENCY_KEY_PATTERN},
}

#: Links from a created job to the operations on it (schemathesis follows them statefully).
JOB_LINKS = {
    "GetJob": {"operationId": "v1_get_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "GetResults": {"operationId": "v1_get_results", "parameters": {"job_id": "$response.body#/job_id"}},
    "ListFiles": {"operationId": "v1_list_files", "parameters": {"job_id": "$response.body#/job_id"}},
    "Seal": {"operationId": "v1_seal_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "Cancel": {"operationId": "v1_cancel_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "Retry": {"operationId": "v1_retry_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "Delete": {"operationId": "v1_delete_job", "parameters": {"job_id": "$response.body#/job_id"}},
    "AddFiles": {"operationId": "v1_add_files", "parameters": {"job_id": "$response.body#/job_id"}},
}
