"""Jobs from and to buckets, against a real S3 endpoint (moto in server mode), a real API and a
real worker: a prefix job with an output prefix (CSV, JSON Lines, Parquet, _SUCCESS), a
manifest with ids and pass-through columns beside an http(s) entry, and each bad bucket input
with the error it gets."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests

from batchvision.core.results import Prediction
from batchvision.core.synthetic import labelled_files
from batchvision.server.exports import export_job
from batchvision.server.keys import JobKeys
from batchvision.server.outputs import output_fields
from batchvision.server.s3 import S3, S3Config, S3Error, S3Url
from batchvision.server.store import JobStore
from batchvision.testing.s3server import MotoServer, S3FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(s3_server: MotoServer) -> Iterator[S3FaultProxy]:
    """The stack reaches the store through a proxy that can throttle or deny on demand."""
    with S3FaultProxy(s3_server.url) as p:
        yield p


@pytest.fixture(scope="module")
def s3_stack(start_private_stack: Any, proxy: S3FaultProxy) -> Any:
    # Any bucket: the tests make a new one each (the scope has a test of its own below).
    stack = start_private_stack(
        "s3",
        s3_endpoint_url=proxy.url,
        s3_max_attempts=3,
        fetch_threads=4,
        s3_allow="*",
        webhook_allow="127.0.0.1/32",
    )
    stack.worker()
    return stack


def _finished(stack: Any, job_id: str, wait_until: Callable[..., Any], output: bool = True) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
        final = doc["status"] in ("succeeded", "partial", "failed", "canceled")
        written = not output or doc["output"]["state"] != "pending"
        return doc if final and written else None

    result: dict[str, Any] = wait_until(
        done, timeout=180, interval=0.2, message=f"job {job_id} and its output"
    )
    return result


def _get(s3_server: MotoServer, url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    body: bytes = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def test_prefix_job_writes_every_format_once_per_image(
    s3_stack: Any,
    s3_server: MotoServer,
    s3_bucket: str,
    demo_model: Any,
    reference_labels: Any,
    wait_until: Callable[..., Any],
) -> None:
    client = s3_server.client()
    files = [(f"set/{n % 3}/{name}", data) for n, (name, data, _) in enumerate(labelled_files(14, seed=24))]
    for key, data in files:
        client.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=data)
    client.put_object(Bucket=s3_bucket, Key="in/set/broken.jpg", Body=b"not an image at all")
    client.put_object(Bucket=s3_bucket, Key="in/README.txt", Body=b"notes")
    resp = requests.post(
        f"{s3_stack.url}/v1/jobs",
        json={"source": f"s3://{s3_bucket}/in/", "output_url": f"s3://{s3_bucket}/out/run1"},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == len(files) + 1
    # Named relative to the prefix, as the images are.
    assert [s["filename"] for s in body["skipped"]] == ["README.txt"]
    job = _finished(s3_stack, body["job_id"], wait_until)
    assert job["status"] == "partial" and job["done"] == len(files) and job["failed"] == 1
    out = job["output"]
    assert out["state"] == "written", out
    assert set(out["files"]) == {"csv", "jsonl", "parquet", "manifest"}

    expected = dict(zip([k for k, _ in files], reference_labels(demo_model, files), strict=True))
    rows = list(csv.DictReader(io.StringIO(_get(s3_server, out["files"]["csv"]).decode())))
    assert sorted(r["filename"] for r in rows) == sorted([*expected, "set/broken.jpg"])  # one row each
    for r in rows:
        if r["filename"] == "set/broken.jpg":
            assert r["error"].startswith(("not_an_image", "invalid_image")), r
        else:
            assert r["label"] == expected[r["filename"]] and r["model"] and r["version"] != "", r
    lines = [json.loads(x) for x in _get(s3_server, out["files"]["jsonl"]).decode().splitlines()]
    assert [x["filename"] for x in lines] == [r["filename"] for r in rows]
    table = pq.read_table(io.BytesIO(_get(s3_server, out["files"]["parquet"])))
    assert table.num_rows == len(rows)
    assert table.column("label").to_pylist() == [r["label"] or None for r in rows]
    manifest = json.loads(_get(s3_server, out["files"]["manifest"]))
    assert manifest["rows"] == len(rows) and manifest["done"] == len(files)
    assert all(manifest["files"][f]["rows"] == len(rows) for f in ("csv", "jsonl", "parquet"))


@pytest.fixture()
def hooks(s3_server: MotoServer, s3_bucket: str) -> Iterator[tuple[str, list[tuple[dict[str, Any], bool]]]]:
    """A webhook receiver that reads the bucket when called, as a real one would: its URL, and
    each delivery's document with whether the output's ``_SUCCESS`` was there at that moment."""
    got: list[tuple[dict[str, Any], bool]] = []
    client = s3_server.client()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - the webhook
            doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prefix = doc.get("output", {}).get("url", "").removeprefix(f"s3://{s3_bucket}/")
            listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("Contents", [])
            got.append((doc, f"{prefix.rstrip('/')}/_SUCCESS" in {o["Key"] for o in listed}))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", got
    httpd.shutdown()
    httpd.server_close()


def test_the_webhook_of_a_job_with_an_output_prefix_waits_for_its_output(
    s3_stack: Any,
    s3_server: MotoServer,
    s3_bucket: str,
    proxy: S3FaultProxy,
    hooks: tuple[str, list[tuple[dict[str, Any], bool]]],
    wait_until: Callable[..., Any],
) -> None:
    # A receiver that reads the results from the bucket when told the job is done finds them
    # whole; one whose output failed for good is told so in the same delivery.
    hook_url, got = hooks
    for name, data, _ in labelled_files(3, seed=31):
        s3_server.client().put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=data)
    # The output prefix "denied" takes the API's test write, then refuses the files themselves.
    proxy.fail("PUT", f"/{s3_bucket}/out/denied/(?!\\.batchvision-write-check)", 403, "AccessDenied")
    try:
        jobs = {}
        for out in ("fine", "denied"):
            resp = requests.post(
                f"{s3_stack.url}/v1/jobs",
                json={
                    "source": f"s3://{s3_bucket}/in/",
                    "output_url": f"s3://{s3_bucket}/out/{out}",
                    "callback_url": hook_url,
                },
                timeout=60,
            )
            assert resp.status_code == 202, resp.text
            jobs[out] = resp.json()["job_id"]
        wait_until(lambda: len(got) >= 2, timeout=180, interval=0.2, message="both webhooks")
    finally:
        proxy.clear()
    by_job = {doc["job_id"]: (doc, success) for doc, success in got}
    assert len(got) == 2 and set(by_job) == set(jobs.values()), got
    fine, success = by_job[jobs["fine"]]
    assert success, "the webhook came before the output's _SUCCESS"
    assert fine["status"] == "succeeded" and fine["output"]["state"] == "written", fine
    assert set(fine["output"]["files"]) == {"csv", "jsonl", "parquet", "manifest"}
    denied, success = by_job[jobs["denied"]]
    assert not success and denied["output"]["state"] == "failed", denied
    assert denied["output"]["error"].startswith("access_denied"), denied
    assert _finished(s3_stack, jobs["denied"], wait_until)["callback"]["state"] == "delivered"


def test_manifest_rows_carry_ids_and_columns_and_vanished_objects_are_image_errors(
    s3_stack: Any,
    s3_server: MotoServer,
    s3_bucket: str,
    demo_model: Any,
    reference_labels: Any,
    wait_until: Callable[..., Any],
) -> None:
    client = s3_server.client()
    files = [(name, data) for name, data, _ in labelled_files(3, seed=5)]
    for name, data in files:
        client.put_object(Bucket=s3_bucket, Key=f"img/{name}", Body=data)
    lines = [
        {"url": f"s3://{s3_bucket}/img/{files[0][0]}", "id": "sku-1", "columns": {"shop": "=north", "n": 1}},
        {"url": f"s3://{s3_bucket}/img/{files[1][0]}", "id": "sku-2", "columns": {"shop": "south"}},
        {"url": f"s3://{s3_bucket}/img/gone.jpg", "id": "sku-3"},
        {"url": f"s3://{s3_bucket}/img/{files[2][0]}", "id": "sku-4"},
    ]
    client.put_object(
        Bucket=s3_bucket, Key="lists/m.jsonl", Body="\n".join(json.dumps(x) for x in lines).encode()
    )
    resp = requests.post(
        f"{s3_stack.url}/v1/jobs",
        json={"manifest": f"s3://{s3_bucket}/lists/m.jsonl", "output_url": f"s3://{s3_bucket}/out/m/"},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    job = _finished(s3_stack, resp.json()["job_id"], wait_until)
    assert job["done"] == 3 and job["failed"] == 1 and job["output"]["state"] == "written"
    rows = requests.get(f"{s3_stack.url}/v1/jobs/{job['job_id']}/results", timeout=10).json()["results"]
    assert [r["id"] for r in rows] == ["sku-1", "sku-2", "sku-3", "sku-4"]
    assert rows[0]["columns"] == {"shop": "=north", "n": 1} and "columns" not in rows[3]
    assert rows[2]["error"]["code"] == "object_not_found"
    labels = reference_labels(demo_model, files)
    assert [rows[i]["label"] for i in (0, 1, 3)] == labels
    out = list(csv.DictReader(io.StringIO(_get(s3_server, job["output"]["files"]["csv"]).decode())))
    assert [(r["id"], r["shop"], r["n"]) for r in out] == [
        ("sku-1", "'=north", "1"),
        ("sku-2", "south", ""),
        ("sku-3", "", ""),
        ("sku-4", "", ""),
    ]
    table = pq.read_table(io.BytesIO(_get(s3_server, job["output"]["files"]["parquet"])))
    assert table.column("id").to_pylist() == ["sku-1", "sku-2", "sku-3", "sku-4"]
    assert table.column("shop").to_pylist() == ["=north", "south", None, None]


def test_bad_bucket_inputs_get_clear_errors(
    s3_stack: Any, s3_server: MotoServer, s3_bucket: str, proxy: S3FaultProxy, wait_until: Callable[..., Any]
) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="docs/a.txt", Body=b"x")
    data = next(labelled_files(1, seed=9))[1]
    client.put_object(Bucket=s3_bucket, Key="ok/a.jpg", Body=data)

    def post(body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{s3_stack.url}/v1/jobs", json=body, timeout=60)

    cases = [
        ({"source": "s3://no-such-bucket-xyz/in/"}, 422, "bucket_not_found"),
        ({"source": f"s3://{s3_bucket}/docs/"}, 422, "no_images"),
        ({"source": f"s3://{s3_bucket}/nothing-here/"}, 422, "no_images"),
        (
            {"source": f"s3://{s3_bucket}/ok/", "output_url": "s3://no-such-bucket-xyz/o/"},
            422,
            "output_not_writable",
        ),
        ({"source": f"s3://{s3_bucket}/ok/", "manifest": f"s3://{s3_bucket}/x.csv"}, 400, "bad_body"),
        ({"manifest": f"s3://{s3_bucket}/missing.csv"}, 422, "object_not_found"),
    ]
    for body, status, code in cases:
        resp = post(body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (body, resp.text)
    for field in ("source", "manifest"):  # a bad bucket name: the error names the field
        resp = post({field: "s3://Bad_Bucket/x.csv"})
        assert (resp.status_code, resp.json()["error"]["code"]) == (422, "bad_url"), resp.text
        assert resp.json()["error"]["details"] == [{"in": "body", "field": field, "reason": "bad_url"}]

    proxy.fail("GET", f"/{s3_bucket}\\?list-type", 403, "AccessDenied", times=1)
    resp = post({"source": f"s3://{s3_bucket}/ok/"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (422, "access_denied"), resp.text

    # Throttled twice, then served: retried with backoff, the image classified.
    proxy.fail("GET", f"/{s3_bucket}/ok/a.jpg", 503, "SlowDown", times=2)
    resp = post({"source": f"s3://{s3_bucket}/ok/"})
    job = _finished(s3_stack, resp.json()["job_id"], wait_until, output=False)
    assert job["status"] == "succeeded", job

    # An output prefix that stops accepting writes after the check: the job succeeds, its
    # output is `failed` with the code, and the results stay readable from the API.
    proxy.fail("PUT", f"/{s3_bucket}/locked/results", 403, "AccessDenied")  # not the test write
    resp = post({"source": f"s3://{s3_bucket}/ok/", "output_url": f"s3://{s3_bucket}/locked/"})
    assert resp.status_code == 202, resp.text
    job = _finished(s3_stack, resp.json()["job_id"], wait_until)
    proxy.clear()
    assert job["status"] == "succeeded" and job["output"]["state"] == "failed", job
    assert job["output"]["error"].startswith("access_denied"), job
    assert requests.get(f"{s3_stack.url}/v1/jobs/{job['job_id']}/results", timeout=10).json()["results"]


def test_failed_prefix_listing_frees_its_idempotency_key(
    start_private_stack: Any, s3_server: MotoServer, s3_bucket: str, proxy: S3FaultProxy
) -> None:
    # A prefix past MAX_OBJECTS_PER_JOB fails after its job was stored: the job is canceled and
    # a retry with the same key must fail the same way, not replay the canceled job.
    stack = start_private_stack(
        "s3-cap",
        s3_endpoint_url=proxy.url,
        s3_max_attempts=3,
        max_objects_per_job=1,
        s3_allow=f"s3://{s3_bucket}/cap/",
    )
    client = s3_server.client()
    for name, data, _ in labelled_files(2, seed=11):
        client.put_object(Bucket=s3_bucket, Key=f"cap/{name}", Body=data)
    headers = {"Idempotency-Key": "prefix-over-cap"}
    for attempt in range(2):
        resp = requests.post(
            f"{stack.url}/v1/jobs", json={"source": f"s3://{s3_bucket}/cap/"}, headers=headers, timeout=60
        )
        assert (resp.status_code, resp.json()["error"]["code"]) == (413, "too_many_objects"), (
            attempt,
            resp.text,
        )


def test_jobs_name_only_the_locations_of_s3_allow_and_never_the_blob_store(
    start_private_stack: Any,
    s3_server: MotoServer,
    s3_bucket: str,
    proxy: S3FaultProxy,
    wait_until: Callable[..., Any],
) -> None:
    # Allowed: in/ and out/ of the test's bucket; the blob store lies inside in/ (in/uploads/).
    b = s3_bucket
    stack = start_private_stack(
        "s3-allow",
        s3_endpoint_url=proxy.url,
        s3_allow=f"s3://{b}/in/, s3://{b}/out",
        blob_url=f"s3://{b}/in/uploads/",
    )
    stack.worker()
    client = s3_server.client()
    files = [(name, data) for name, data, _ in labelled_files(2, seed=13)]
    for name, data in files:
        client.put_object(Bucket=b, Key=f"in/photos/{name}", Body=data)
        client.put_object(Bucket=b, Key=f"secret/{name}", Body=data)
    client.put_object(Bucket=b, Key="secret/m.csv", Body=f"url\ns3://{b}/in/photos/{files[0][0]}\n".encode())

    def refused(
        body: dict[str, Any], field: str, why: str, status: int = 403, code: str = "s3_not_allowed"
    ) -> None:
        resp = requests.post(f"{stack.url}/v1/jobs", json=body, timeout=60)
        error = resp.json()["error"]
        assert (resp.status_code, error["code"]) == (status, code), (body, resp.text)
        assert error["details"] == [{"in": "body", "field": field, "reason": code}], resp.text
        assert why in error["message"], (why, error["message"])

    refused({"source": f"s3://{b}/secret/"}, "source", "outside BATCHVISION_S3_ALLOW")
    refused({"source": f"s3://{b}/"}, "source", "the blob store of BLOB_URL")  # it holds in/uploads/
    refused({"source": "s3://another-bucket-xyz/in/"}, "source", "outside BATCHVISION_S3_ALLOW")
    refused({"source": f"s3://{b}/outside/"}, "source", "outside BATCHVISION_S3_ALLOW")  # not out/
    refused({"manifest": f"s3://{b}/secret/m.csv"}, "manifest", "outside BATCHVISION_S3_ALLOW")
    refused({"source": f"s3://{b}/in/photos/", "output_url": f"s3://{b}/secret/"}, "output_url", "outside")
    # Listing in/ would read every waiting upload of every tenant: refused although in/ is allowed.
    refused({"source": f"s3://{b}/in/"}, "source", "the blob store of BLOB_URL")
    refused({"source": f"s3://{b}/in/uploads/x/"}, "source", "the blob store of BLOB_URL")
    # A '..' segment would resolve outside the prefix it starts with, in a store or a proxy that
    # resolves it: refused wherever it is.
    for body, field in (
        ({"source": f"s3://{b}/in/../secret/"}, "source"),
        ({"manifest": f"s3://{b}/in/../secret/m.csv"}, "manifest"),
        ({"source": f"s3://{b}/in/photos/", "output_url": f"s3://{b}/out/../x/"}, "output_url"),
    ):
        refused(body, field, "'..' segment", status=422, code="bad_url")

    # Allowed: a prefix job writing to out/, and a URL job whose one outside entry is an image
    # error while the other image is classified.
    resp = requests.post(
        f"{stack.url}/v1/jobs",
        json={"source": f"s3://{b}/in/photos/", "output_url": f"s3://{b}/out/r/"},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    job = _finished(stack, resp.json()["job_id"], wait_until)
    assert (job["status"], job["done"], job["output"]["state"]) == ("succeeded", 2, "written"), job
    urls = [
        f"s3://{b}/in/photos/{files[0][0]}",
        f"s3://{b}/secret/{files[1][0]}",
        f"s3://{b}/in/uploads/j/0",
        f"s3://{b}/in/photos/../../secret/{files[1][0]}",
    ]
    resp = requests.post(f"{stack.url}/v1/jobs", json={"urls": urls}, timeout=60)
    assert resp.status_code == 202, resp.text
    job = _finished(stack, resp.json()["job_id"], wait_until, output=False)
    rows = requests.get(f"{stack.url}/v1/jobs/{job['job_id']}/results", timeout=10).json()["results"]
    codes = [(r.get("error") or {}).get("code") for r in rows]
    assert codes == [None, "s3_not_allowed", "s3_not_allowed", "bad_url"], rows
    assert "'..' segment" in rows[3]["error"]["message"], rows
    assert rows[0]["label"], rows


def test_a_job_exported_again_has_no_manifest_until_its_new_files_are_whole(
    store: JobStore, s3_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retried job is written again over its first files; a _SUCCESS of the first export
    # beside files half replaced (or never replaced: the new export failed) would lie.
    store.create("j", model="m")
    store.redis.hset(JobKeys.of("j").job, mapping=output_fields(f"s3://{s3_bucket}/out/"))
    store.add_files("j", [("a.jpg", "a.jpg")])
    store.seal("j")
    store.record("j", [(0, Prediction("cat", 1, 0.9, (), "m", 1))])
    s3 = S3(S3Config(endpoint_url=s3_server.url))
    export_job(store, s3, "j", ["csv", "parquet"])
    assert s3.head(S3Url(s3_bucket, "out/_SUCCESS")) is not None

    def refused(*args: Any, **kwargs: Any) -> None:
        raise S3Error("access denied", code="access_denied")

    monkeypatch.setattr(s3, "put_file", refused)
    monkeypatch.setattr(s3, "put", refused)
    with pytest.raises(S3Error):
        export_job(store, s3, "j", ["csv", "parquet"])
    assert s3.head(S3Url(s3_bucket, "out/_SUCCESS")) is None
