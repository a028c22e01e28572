"""The API contract is generated from the code: every route is declared and in the document,
the document is valid OpenAPI 3.1, and the validators name what is wrong."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate

from api import contract as c
from api import create_app
from batchvision.core import documents as d
from batchvision.core.results import JobStatus
from batchvision.core.settings import Settings


@pytest.fixture(scope="module")
def app() -> Flask:
    # Nothing connects until a request needs Redis: the URL map and the document need none.
    return create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))


@pytest.fixture(scope="module")
def doc(app: Flask) -> dict[str, Any]:
    return c.openapi(app)


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_is_declared_and_in_the_document(app: Flask, doc: dict[str, Any]) -> None:
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    seen = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        assert hasattr(view, "__contract__"), f"{rule.rule} ({rule.endpoint}) declares no contract"
        if view.__contract__ is None:  # deliberately undocumented (docs page assets)
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in the document"
            seen.add((path, method))
    assert seen == documented  # and nothing in the document that the app does not serve
    assert len(documented) >= 12


def test_query_parameters_come_from_the_models(doc: dict[str, Any]) -> None:
    params = {p["name"]: p for p in doc["paths"]["/v1/jobs/{job_id}/results"]["get"]["parameters"]}
    assert set(params) == {"job_id", "format", "offset", "limit"}
    assert params["offset"]["schema"]["minimum"] == 0
    assert params["job_id"]["schema"]["pattern"] == d.JOB_ID_PATTERN
    fmt = params["format"]["schema"]
    assert fmt.get("enum") == ["json", "jsonl", "csv"]


def test_status_enum_and_models_are_not_copied_by_hand(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert set(schemas["Job"]["required"]) >= {"job_id", "status", "total", "done", "failed", "canceled"}
    assert "OpenJob" in schemas and schemas["OpenJob"]["properties"]["expected"]["anyOf"][0]["minimum"] == 0


@pytest.mark.parametrize(
    ("path", "method", "statuses"),
    [
        (
            "/v1/jobs",
            "post",
            {200, 202, 400, 408, 401, 403, 404, 409, 410, 413, 414, 415, 422, 429, 431, 503},
        ),
        ("/v1/classify", "post", {200, 202, 400, 408, 401, 404, 409, 410, 413, 414, 415, 422, 429, 431, 503}),
        (
            "/v1/jobs/{job_id}/files",
            "post",
            {202, 400, 401, 404, 408, 409, 410, 413, 414, 415, 422, 429, 431, 503},
        ),
        ("/v1/jobs/{job_id}", "get", {200, 400, 401, 404, 410, 414, 429, 431, 503}),
        ("/readyz", "get", {200, 414, 431, 503}),
        ("/v1/jobs/{job_id}/retry", "post", {200, 202, 400, 401, 404, 409, 410, 414, 429, 431, 503}),
        ("/v1/jobs/{job_id}/cancel", "post", {200, 400, 401, 404, 410, 414, 429, 431, 503}),
        ("/v1/jobs/{job_id}", "delete", {200, 204, 400, 401, 404, 410, 414, 429, 431, 503}),
    ],
)
def test_documented_status_codes(doc: dict[str, Any], path: str, method: str, statuses: set[int]) -> None:
    assert {int(s) for s in doc["paths"][path][method]["responses"]} == statuses


def test_create_links_to_the_operations_on_the_job(doc: dict[str, Any]) -> None:
    links = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    operation_ids = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    assert {link["operationId"] for link in links.values()} <= operation_ids
    assert len(links) == 8


def test_every_error_response_is_the_error_document(doc: dict[str, Any]) -> None:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    schema = resp["content"]["application/json"]["schema"]
                    # /v2 speaks the Open Inference Protocol, whose error body is {"error": "..."};
                    # what gunicorn refuses before any route (414, 431) is the error document.
                    v2 = path.startswith("/v2") and int(status) not in (414, 431)
                    name = "InferenceError" if v2 else "ErrorDocument"
                    assert schema == {"$ref": f"#/components/schemas/{name}"}, (path, method, status)
