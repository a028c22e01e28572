"""The running API against its own contract: schemathesis with every check, and a table of bad
inputs across the routes, each refused with a clear 4xx that names what is wrong."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from batchvision.core.documents import ClassifyResult
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
JPEG = next(iter(labelled_files(1, seed=3)))[1]
UNKNOWN = "0123456789abcdef0123456789abcdef"


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def _open_job(api: str) -> str:
    return str(requests.post(f"{api}/v1/jobs", json={"expected": 1}, timeout=10).json()["job_id"])


def _sealed_job(api: str) -> str:
    job = _open_job(api)
    requests.post(f"{api}/v1/jobs/{job}/seal", timeout=10)
    return job


# (name, method, path, kwargs, status, error code, text the message must contain)
CASES: list[tuple[str, str, str, dict[str, Any], int, str, str]] = [
    ("negative expected", "POST", "/v1/jobs", {"json": {"expected": -5}}, 400, "bad_body", "expected"),
    ("string expected", "POST", "/v1/jobs", {"json": {"expected": "x"}}, 400, "bad_body", "expected"),
    ("huge expected", "POST", "/v1/jobs", {"json": {"expected": 1e12}}, 400, "bad_body", "expected"),
    (
        "unknown body field",
        "POST",
        "/v1/jobs",
        {"json": {"expected": 1, "exp": 2}},
        400,
        "bad_body",
        "body field 'exp': Extra inputs are not permitted (got 2); this body takes: expected, callback_url",
    ),
    (
        "a URL job's field misspelt",
        "POST",
        "/v1/jobs",
        {"json": {"url": ["http://x/a.jpg"]}},
        400,
        "bad_body",
        '{"urls": [...]} for images by URL',
    ),
    (
        "JSON array body",
        "POST",
        "/v1/jobs",
        {"json": [1, 2]},
        400,
        "bad_body",
        "the body must be a JSON object, not list: its fields are expected",
    ),
    (
        "broken JSON",
        "POST",
        "/v1/jobs",
        {"data": b"{", "headers": {"Content-Type": "application/json"}},
        400,
        "bad_body",
        "JSON",
    ),
    ("no body at all", "POST", "/v1/jobs", {}, 415, "unsupported_media_type", "Content-Type"),
    (
        "text body",
        "POST",
        "/v1/jobs",
        {"data": b"hi", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    (
        "text body: every accepted type named",
        "POST",
        "/v1/jobs",
        {"data": b"hi", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
        "application/octet-stream body, or an application/zip (application/x-zip-compressed)",
    ),
    (
        "filename with a multipart body",
        "POST",
        "/v1/jobs?filename=a.jpg",
        {"files": {"files": ("b.jpg", JPEG)}},
        400,
        "bad_parameter",
        "'filename' names a raw image body",
    ),
    (
        "filename with a zip body",
        "POST",
        "/v1/classify?filename=a.jpg",
        {"data": b"PK\x05\x06" + bytes(18), "headers": {"Content-Type": "application/zip"}},
        400,
        "bad_parameter",
        "archive member",
    ),
    (
        "multipart part of another name",
        "POST",
        "/v1/jobs",
        {"files": {"other": ("a.jpg", JPEG)}},
        400,
        "bad_body",
        "other",
    ),
    (
        "multipart text field",
        "POST",
        "/v1/jobs",
        {"data": {"files": "not a file"}, "files": {"files": ("a.jpg", JPEG)}},
        400,
        "bad_body",
        "must be a file",
    ),
    (
        "seal=maybe",
        "POST",
        "/v1/jobs?seal=maybe",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "seal",
    ),
    (
        "top_k that is not a number",
        "POST",
        "/v1/classify?top_k=abc",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "top_k: classes each result lists, 1 to the model's number of classes",
    ),
    (
        "timeout that is not a number",
        "POST",
        "/v1/classify?timeout=soon",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "timeout: seconds to wait, 0 to 3600",
    ),
    (
        "unknown query parameter",
        "POST",
        "/v1/jobs?sael=false",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "sael",
    ),
    (
        "empty filename",
        "POST",
        "/v1/jobs?filename=",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "filename",
    ),
    (
        "2000-char filename",
        "POST",
        "/v1/jobs?filename=" + "a" * 2000,
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "filename",
    ),
    (
        "output_url on an upload",
        "POST",
        "/v1/jobs?output_url=s3://bucket/out/",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "output_url",
    ),
    (
        "output_url on an open job",
        "POST",
        "/v1/jobs?output_url=s3://bucket/out/",
        {"json": {}},
        400,
        "bad_parameter",
        "output_url",
    ),
    (
        "Idempotency-Key with a space",
        "POST",
        "/v1/jobs",
        {"json": {}, "headers": {"Idempotency-Key": "a b"}},
        400,
        "bad_header",
        "Idempotency-Key",
    ),
    (
        "300-char Idempotency-Key",
        "POST",
        "/v1/jobs",
        {"json": {}, "headers": {"Idempotency-Key": "k" * 300}},
        400,
        "bad_header",
        "Idempotency-Key",
    ),
    (
        "not an image",
        "POST",
        "/v1/jobs",
        {"data": b"GIF89", "headers": {"Content-Type": "image/gif"}},
        422,
        "no_valid_images",
        "none of the 1 files",
    ),
    (
        "zip with ../",
        "POST",
        "/v1/jobs",
        {"data": _zip("../evil.jpg", JPEG), "headers": {"Content-Type": "application/zip"}},
        422,
        "archive_rejected",
        "..",
    ),
    (
        "two archive parts",
        "POST",
        "/v1/jobs",
        {"files": [("archive", ("a.zip", _zip("a.jpg", JPEG))), ("archive", ("b.zip", _zip("b.jpg", JPEG)))]},
        400,
        "too_many_archives",
        "archive",
    ),
    ("malformed job id", "GET", "/v1/jobs/abc", {}, 400, "bad_job_id", "32 lowercase hex"),
    ("uppercase job id", "GET", "/v1/jobs/" + UNKNOWN.upper(), {}, 400, "bad_job_id", "job id"),
    ("unknown job", "GET", f"/v1/jobs/{UNKNOWN}", {}, 404, "job_not_found", UNKNOWN),
    ("status with a query", "GET", f"/v1/jobs/{UNKNOWN}?verbose=1", {}, 400, "bad_parameter", "verbose"),
    ("format=xml", "GET", f"/v1/jobs/{UNKNOWN}/results?format=xml", {}, 400, "bad_parameter", "format"),
    ("offset=-1", "GET", f"/v1/jobs/{UNKNOWN}/results?offset=-1", {}, 400, "bad_parameter", "offset"),
    ("offset=abc", "GET", f"/v1/jobs/{UNKNOWN}/results?offset=abc", {}, 400, "bad_parameter", "offset"),
    ("limit=0", "GET", f"/v1/jobs/{UNKNOWN}/results?limit=0", {}, 400, "bad_parameter", "limit"),
    (
        "offset twice",
        "GET",
        f"/v1/jobs/{UNKNOWN}/results?offset=1&offset=2",
        {},
        400,
        "bad_parameter",
        "more than once",
    ),
    (
        "timeout=-1",
        "POST",
        "/v1/classify?timeout=-1",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "timeout",
    ),
    (
        "timeout=abc",
        "POST",
        "/v1/classify?timeout=abc",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "timeout",
    ),
    (
        "timeout=1e9",
        "POST",
        "/v1/classify?timeout=1e9",
        {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}},
        400,
        "bad_parameter",
        "timeout",
    ),
    ("cancel unknown job", "POST", f"/v1/jobs/{UNKNOWN}/cancel", {}, 404, "job_not_found", UNKNOWN),
    ("delete unknown job", "DELETE", f"/v1/jobs/{UNKNOWN}", {}, 404, "job_not_found", UNKNOWN),
    ("retry unknown job", "POST", f"/v1/jobs/{UNKNOWN}/retry", {}, 404, "job_not_found", UNKNOWN),
    ("PUT on a job", "PUT", f"/v1/jobs/{UNKNOWN}", {}, 405, "method_not_allowed", "not allowed"),
    ("unknown route", "GET", "/v1/nothing", {}, 404, "not_found", ""),
    (
        "file name not UTF-8",
        "POST",
        "/v1/jobs",
        {
            "data": b'--b\r\nContent-Disposition: form-data; name="files"; filename="\xff.jpg"\r\n\r\n'
            + JPEG
            + b"\r\n--b--\r\n",
            "headers": {"Content-Type": "multipart/form-data; boundary=b"},
        },
        400,
        "no_files",
        "must be UTF-8",
    ),
    (
        "more parts than files allowed",
        "POST",
        "/v1/jobs",
        {"files": [("files", (f"{i}.jpg", b"x")) for i in range(1000 + 17)]},
        413,
        "request_entity_too_large",
        "more parts than a request may (1000 files",
    ),
]


def _send(api: str, method: str, path: str, kwargs: dict[str, Any]) -> requests.Response:
    return requests.request(method, api + path, timeout=30, **kwargs)


def _check(resp: requests.Response, status: int, code: str, text: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == code, err
    assert text in err["message"] or text in json.dumps(err.get("details")), err
    return dict(err)


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs", "status", "code", "text"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_by_name(
    api_url: str, name: str, method: str, path: str, kwargs: dict[str, Any], status: int, code: str, text: str
) -> None:
    _check(_send(api_url, method, path, kwargs), status, code, text)


def test_bad_inputs_on_a_real_job(api_url: str) -> None:
    sealed = _sealed_job(api_url)
    opened = _open_job(api_url)
    raw = {"data": JPEG, "headers": {"Content-Type": "image/jpeg"}}
    _check(_send(api_url, "POST", f"/v1/jobs/{opened}/files", raw), 400, "filename_required", "filename")
    _check(_send(api_url, "POST", f"/v1/jobs/{sealed}/files?filename=a.jpg", raw), 409, "job_sealed", sealed)
    _check(_send(api_url, "POST", f"/v1/jobs/{opened}/seal?now=1", {}), 400, "bad_parameter", "now")
    _check(_send(api_url, "GET", f"/v1/jobs/{opened}/results?limit=-3", {}), 400, "bad_parameter", "limit")
    # One Idempotency-Key, two different requests: the second is refused, not replayed.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = _send(api_url, "POST", "/v1/jobs", {"json": {"expected": 1}, "headers": key})
    assert first.status_code == 202
    again = _send(api_url, "POST", "/v1/jobs", {"json": {"expected": 1}, "headers": key})
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    _check(
        _send(api_url, "POST", "/v1/jobs", {"json": {"expected": 2}, "headers": key}),
        409,
        "idempotency_key_reused",
        "different request",
    )
    # 405 names the allowed methods (RFC 9110).
    assert "GET" in _send(api_url, "PUT", f"/v1/jobs/{sealed}", {}).headers["Allow"]


@pytest.mark.slow
def test_schemathesis_every_check_finds_nothing(api_url: str, settings: Settings, artifacts: Path) -> None:
    report = artifacts / "schemathesis.txt"
    # A long poll (`?wait=`, `?timeout=`) on a job that does not finish is answered after
    # SYNC_TIMEOUT_S: the client must wait longer than that, or the answer races its timeout.
    request_timeout = settings.sync_timeout_s + 30
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(HERE / "schemathesis.toml"),
            "run",
            f"{api_url}/openapi.json",
            # Every check is on by default; schemathesis.toml switches off the one that does not
            # apply here, with its reason (no --checks flag: it would override the file).
            "--max-examples",
            "100",
            "--generation-deterministic",
            "--request-timeout",
            str(request_timeout),
            "--max-failures",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-6000:]
    cases = re.search(r"(\d+) generated", proc.stdout)
    assert cases is not None and int(cases.group(1)) >= 1000, proc.stdout[-3000:]
    links = re.search(r"API Links:\s+(\d+) covered", proc.stdout)
    assert links is not None and int(links.group(1)) >= 10, proc.stdout[-3000:]  # stateful phase ran
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", proc.stdout), f"phase {phase} did not pass:\n{proc.stdout[-3000:]}"
    print(f"schemathesis: {cases.group(0)}, {links.group(0)}; report in {report}")


def test_a_classified_zip_lists_its_members_that_are_not_images(api_url: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat.jpg", JPEG)
        zf.writestr("notes.txt", "not an image")
    resp = requests.post(
        f"{api_url}/v1/classify?timeout=30",
        data=buf.getvalue(),
        headers={"Content-Type": "application/zip"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    doc = ClassifyResult.model_validate(resp.json())
    assert [r.filename for r in doc.results] == ["cat.jpg"]
    assert [s.filename for s in doc.skipped] == ["notes.txt"] and doc.skipped[0].reason


def test_a_retried_classify_with_its_key_returns_the_first_job(api_url: str) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "image/jpeg"}
    first = requests.post(f"{api_url}/v1/classify?timeout=30", data=JPEG, headers=key, timeout=60)
    again = requests.post(f"{api_url}/v1/classify?timeout=30", data=JPEG, headers=key, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.json()["results"] == first.json()["results"] and len(first.json()["results"]) == 1
    other = requests.post(f"{api_url}/v1/classify", data=JPEG + b"\0", headers=key, timeout=60)
    _check(other, 409, "idempotency_key_reused", "different request")
