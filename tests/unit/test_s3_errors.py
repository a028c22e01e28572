"""What the API answers for an S3 failure: a throttled or unreachable store is a wait (``503``
with ``Retry-After``), anything else the request's own problem (``422``)."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError, SSLError
from flask import Flask
from urllib3 import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError
from urllib3.exceptions import ReadTimeoutError as PoolReadTimeout

from api.errors import RETRY_AFTER_S, register
from batchvision.server.s3 import S3Error, _error


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("s3_throttled", 503),
        ("s3_unavailable", 503),
        ("bucket_not_found", 422),
        ("object_not_found", 422),
        ("access_denied", 422),
        ("too_large", 422),
        ("bad_url", 422),
        ("s3_error", 422),
    ],
)
def test_s3_error_status_and_retry_after(code: str, status: int) -> None:
    app = Flask(__name__)
    register(app)

    @app.get("/fail")
    def fail() -> str:
        raise S3Error("listing s3://b/p/: failed", code=code)

    resp = app.test_client().get("/fail")
    assert (resp.status_code, resp.get_json()["error"]["code"]) == (status, code)
    assert resp.headers.get("Retry-After") == (str(RETRY_AFTER_S) if status == 503 else None)
    assert S3Error("m", code=code).transient is (status == 503)


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://minio.internal:9000/bucket/key"),
        ReadTimeoutError(endpoint_url="https://minio.internal:9000/bucket/key"),
        PoolReadTimeout(HTTPConnectionPool("minio.internal", 9000), "/bucket/key", "Read timed out."),
        SSLError(
            endpoint_url="https://minio.internal:9000", error="certificate is not valid for 'minio.internal'"
        ),
        ConnectTimeoutError(None, "Connection to minio.internal timed out. (connect timeout=5)"),
        NameResolutionError("minio.internal", None, OSError("Name or service not known")),  # type: ignore[arg-type]
    ],
    ids=["botocore-connect", "botocore-read", "urllib3-pool", "tls", "connect-timeout", "name-resolution"],
)
def test_an_unreachable_store_is_named_without_its_address(exc: Exception) -> None:
    # A job's caller sees the kind of fault; the store's address is the operator's (in the log).
    err = _error(exc, "reading s3://bucket/key")
    assert err.code == "s3_unavailable" and err.message.startswith("reading s3://bucket/key: the store")
    assert "minio.internal" not in err.message and "9000" not in err.message, err.message
