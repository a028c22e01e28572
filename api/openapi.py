"""The OpenAPI 3 document for ``/openapi.json`` (also drives schemathesis in the tests)."""

from __future__ import annotations

from typing import Any

from batchvision import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "Error")
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_UPLOAD: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["files"],
            }
        },
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}

_CREATE = {
    "required": True,
    "content": {
        **_UPLOAD["content"],
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {
            "schema": {"type": "object", "properties": {"expected": {"type": "integer", "minimum": 0}}}
        },
    },
}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
            }
        },
    },
    "Job": {
        "type": "object",
        "required": ["job_id", "status", "total", "done", "failed", "created_at", "finished_at", "model"],
        "properties": {
            "job_id": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["queued", "running", "succeeded", "partial", "failed", "canceled"],
            },
            "total": {"type": "integer"},
            "done": {"type": "integer"},
            "failed": {"type": "integer"},
            "canceled": {"type": "integer"},
            "created_at": {"type": "number"},
            "finished_at": {"type": "number", "nullable": True},
            "model": {"type": "string"},
            "status_url": {"type": "string"},
            "results_url": {"type": "string"},
        },
    },
    "Result": {
        "type": "object",
        "required": ["index", "filename", "status"],
        "properties": {
            "index": {"type": "integer"},
            "filename": {"type": "string"},
            "status": {"type": "string", "enum": ["ok", "error", "pending"]},
            "label": {"type": "string"},
            "class_id": {"type": "integer"},
            "score": {"type": "number"},
            "top_k": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
                },
            },
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}
_SCHEMAS["Results"] = {
    "type": "object",
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string"},
        "results": {"type": "array", "items": _ref("Result")},
    },
}


def document() -> dict[str, Any]:
    """The whole API, described once."""
    job = _json(_ref("Job"), "The job")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "batchvision",
            "version": __version__,
            "description": "Batch image classification.",
        },
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit images (multipart 'files' parts, or one raw image body)",
                    "parameters": [_IDEMPOTENCY],
                    "requestBody": _CREATE,
                    "responses": {
                        "202": job,
                        "400": _ERR,
                        "413": _ERR,
                        "422": _ERR,
                        "429": _ERR,
                        "503": _ERR,
                    },
                }
            },
            "/v1/classify": {
                "post": {
                    "summary": "Submit and wait for the results",
                    "parameters": [
                        {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0}}
                    ],
                    "requestBody": _UPLOAD,
                    "responses": {
                        "200": _json(_ref("Results"), "Results"),
                        "202": job,
                        "400": _ERR,
                        "413": _ERR,
                        "422": _ERR,
                        "429": _ERR,
                    },
                }
            },
            "/v1/jobs/{job_id}/files": {
                "parameters": [_JOB_ID],
                "post": {
                    "summary": "Add a part to an open job (idempotent per relative path)",
                    "requestBody": _UPLOAD,
                    "responses": {
                        "202": job,
                        "400": _ERR,
                        "404": _ERR,
                        "409": _ERR,
                        "413": _ERR,
                        "422": _ERR,
                    },
                },
                "get": {
                    "summary": "Relative paths the job already has",
                    "responses": {"200": _json({"type": "object"}, "Files"), "404": _ERR, "410": _ERR},
                },
            },
            "/v1/jobs/{job_id}/seal": {
                "parameters": [_JOB_ID],
                "post": {
                    "summary": "The upload is complete",
                    "responses": {"200": job, "404": _ERR, "410": _ERR},
                },
            },
            "/v1/jobs/{job_id}": {
                "parameters": [_JOB_ID],
                "get": {
                    "summary": "Job status and progress",
                    "responses": {"200": job, "404": _ERR, "410": _ERR},
                },
                "delete": {
                    "summary": "Cancel what is not classified yet",
                    "responses": {"200": job, "404": _ERR, "410": _ERR},
                },
            },
            "/v1/jobs/{job_id}/results": {
                "parameters": [_JOB_ID],
                "get": {
                    "summary": "Per-image results in upload order",
                    "parameters": [
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["json", "jsonl", "csv"]},
                        },
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    ],
                    "responses": {
                        "200": {
                            "description": "Results",
                            "content": {
                                "application/json": {"schema": _ref("Results")},
                                "application/x-ndjson": {"schema": {"type": "string"}},
                                "text/csv": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _ERR,
                        "404": _ERR,
                        "410": _ERR,
                    },
                },
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "alive")}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (Redis reachable)",
                    "responses": {"200": _json({"type": "object"}, "ready"), "503": _ERR},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }
