"""The S3 client (batchvision/server/s3.py) against a real S3 HTTP endpoint (moto in server
mode): streamed listing across pages, atomic single and multipart writes, retries on
throttling, and each failure's error code."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from batchvision.cli.redis_server import free_port
from batchvision.core.results import Prediction, Row
from batchvision.server import served as served_module
from batchvision.server.exports import part_url
from batchvision.server.s3 import S3, S3Config, S3Error, S3Url
from batchvision.testing.s3server import CREDENTIALS, MotoServer, S3FaultProxy


@pytest.fixture()
def s3(s3_server: MotoServer) -> S3:
    return S3(S3Config(endpoint_url=s3_server.url, max_attempts=4))


def test_parse_refuses_what_is_not_a_bucket_url() -> None:
    assert S3Url.parse("s3://bucket/a/b.jpg") == S3Url("bucket", "a/b.jpg")
    assert str(S3Url.parse("s3://bucket")) == "s3://bucket/"
    assert S3Url.parse("s3://bucket/p").child("x") == S3Url("bucket", "p/x")
    for bad in ("http://x/y", "s3://", "s3://UPPER/x", "s3://ab/x", "s3://-bad/x", "s3://b\nx/y"):
        with pytest.raises(S3Error) as err:
            S3Url.parse(bad)
        assert err.value.code == "bad_url", bad


def test_listing_streams_every_page(s3: S3, s3_server: MotoServer, s3_bucket: str) -> None:
    client = s3_server.client()
    for i in range(1234):
        client.put_object(Bucket=s3_bucket, Key=f"in/{i:05}.jpg", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="in/folder/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="other/1.jpg", Body=b"x")
    listed = s3.list(S3Url(s3_bucket, "in/"), page_size=500)
    first = next(listed)  # a generator: the first key comes before the last page is asked for
    assert first.key == "in/00000.jpg" and first.size == 1
    keys = [first.key, *(o.key for o in listed)]
    assert keys == [f"in/{i:05}.jpg" for i in range(1234)]


def test_writes_are_whole_single_and_multipart(s3: S3, s3_bucket: str) -> None:
    big = bytes(range(256)) * (40 * 1024 * 4)  # 40 MiB: three parts of 16 MiB
    s3.put_file(S3Url(s3_bucket, "big.bin"), io.BytesIO(big))
    head = s3.head(S3Url(s3_bucket, "big.bin"))
    assert head is not None and head.size == len(big) and head.etag.endswith("-3")
    assert s3.get(S3Url(s3_bucket, "big.bin")) == big
    s3.put(S3Url(s3_bucket, "small.txt"), b"hello", "text/plain")
    assert s3.get(S3Url(s3_bucket, "small.txt")) == b"hello"
    with pytest.raises(S3Error) as err:
        s3.get(S3Url(s3_bucket, "big.bin"), max_bytes=1000)
    assert err.value.code == "too_large"


def test_failures_have_their_codes(s3: S3, s3_bucket: str) -> None:
    cases = {
        "s3://no-such-bucket-here/x.jpg": "bucket_not_found",
        f"s3://{s3_bucket}/missing.jpg": "object_not_found",
    }
    for url, code in cases.items():
        with pytest.raises(S3Error) as err:
            s3.get(S3Url.parse(url))
        assert err.value.code == code, url
    with pytest.raises(S3Error) as err:
        list(s3.list(S3Url("no-such-bucket-here", "")))
    assert err.value.code == "bucket_not_found"
    assert s3.head(S3Url(s3_bucket, "missing.jpg")) is None


def test_a_store_that_cannot_be_reached_is_reported_without_its_address(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    # The message goes to the job's caller (a 503, an image's error row): the endpoint, and any
    # credentials in it, are the operator's (the log has them).
    endpoint = f"http://minio-admin:Sup3rSecret@127.0.0.1:{free_port()}"
    s3 = S3(S3Config(endpoint_url=endpoint, max_attempts=1, connect_timeout_s=2))
    with pytest.raises(S3Error) as err:
        s3.get(S3Url("bucket", "x.jpg"))
    assert err.value.code == "s3_unavailable"
    assert "the store cannot be reached" in err.value.message
    assert "Sup3rSecret" not in err.value.message and "127.0.0.1" not in err.value.message, err.value.message
    assert "127.0.0.1" in caplog.text


def test_throttling_is_retried_then_reported(s3_server: MotoServer, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"abc")
    with S3FaultProxy(s3_server.url) as proxy:
        s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=4))
        proxy.fail("GET", f"/{s3_bucket}/a.jpg", 503, "SlowDown", times=3)
        assert s3.get(S3Url(s3_bucket, "a.jpg")) == b"abc"  # three SlowDown answers, then the object
        assert sum(proxy.hits.values()) == 3
        proxy.fail("GET", f"/{s3_bucket}/a.jpg", 503, "SlowDown")
        with pytest.raises(S3Error) as err:
            s3.get(S3Url(s3_bucket, "a.jpg"))
        assert err.value.code == "s3_throttled" and err.value.transient
        assert sum(proxy.hits.values()) == 3 + 4  # every attempt asked, none more
        proxy.clear()
        proxy.fail("PUT", f"/{s3_bucket}/locked/", 403, "AccessDenied")
        for write in (
            lambda: s3.put(S3Url(s3_bucket, "locked/x"), b"1"),
            lambda: s3.put_file(S3Url(s3_bucket, "locked/y"), io.BytesIO(b"1")),
        ):
            with pytest.raises(S3Error) as err:
                write()
            assert err.value.code == "access_denied" and not err.value.transient
        assert s3.head(S3Url(s3_bucket, "locked/x")) is None


def test_every_call_keeps_its_retries_however_long_the_throttling_lasts(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    # botocore's retry budget per client lasts about a hundred throttled retries: the calls
    # after those (one client serves every fetch thread) were not retried at all.
    calls, attempts = 120, 2
    with S3FaultProxy(s3_server.url) as proxy:
        s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=attempts))
        proxy.fail("GET", f"/{s3_bucket}/a.jpg", 503, "SlowDown")

        def throttled(_: int) -> str:
            with pytest.raises(S3Error) as err:
                s3.get(S3Url(s3_bucket, "a.jpg"))
            return err.value.code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(throttled, range(calls))) == {"s3_throttled"}
        assert sum(proxy.hits.values()) == calls * attempts


def test_a_body_cut_off_while_it_streams_is_read_again(s3_server: MotoServer, s3_bucket: str) -> None:
    # botocore retries a request, not the read of its body: S3.get asks again itself.
    data = bytes(range(256)) * 400
    s3_server.client().put_object(Bucket=s3_bucket, Key="cut.bin", Body=data)
    with S3FaultProxy(s3_server.url) as proxy:
        s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=3))
        proxy.cut("GET", f"/{s3_bucket}/cut.bin", times=2)
        assert s3.get(S3Url(s3_bucket, "cut.bin")) == data  # two cut answers, then the object
        assert sum(proxy.hits.values()) == 2
        proxy.cut("GET", f"/{s3_bucket}/cut.bin")
        with pytest.raises(S3Error) as err:
            s3.get(S3Url(s3_bucket, "cut.bin"))
        assert err.value.code in ("s3_unavailable", "incomplete_download")
        assert sum(proxy.hits.values()) == 2 + 3  # every attempt read, none more


def test_rows_of_a_written_part_whose_read_breaks_off_are_served_whole(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    # /results streams a written part's rows after the answer began: a read that broke off
    # there ended the client's answer short.
    rows = [Row(i, f"{i}.jpg", Prediction(f"c{i}", i, 0.5, (), "m", 1)) for i in range(2000)]
    body = "".join(json.dumps(r.document()) + "\n" for r in rows).encode()
    prefix = S3Url(s3_bucket, "out/")
    s3_server.client().put_object(Bucket=s3_bucket, Key=part_url(prefix, "jsonl", 0).key, Body=body)
    with S3FaultProxy(s3_server.url) as proxy:
        s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=3))
        proxy.cut("GET", f"/{s3_bucket}/out/jsonl/part-00000.jsonl", times=1)
        served = list(served_module._part_rows(s3, prefix, 0, 2000, 5, 2000))
        assert proxy.hits and sum(proxy.hits.values()) == 1  # the cut happened
    assert [r.index for r in served] == list(range(5, 2000))
    assert served == rows[5:]


def test_deletes_carry_the_content_md5_that_older_s3_compatible_stores_require(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    s3 = S3(S3Config(endpoint_url=s3_server.url))
    s3.put(S3Url(s3_bucket, "x"), b"1")
    sent: list[tuple[bytes, dict[str, str]]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append((request.body, dict(request.headers)))

    s3._client.meta.events.register("before-send.s3.DeleteObjects", capture)
    s3.delete([S3Url(s3_bucket, "x")])
    assert s3.head(S3Url(s3_bucket, "x")) is None
    ((body, headers),) = sent
    md5 = headers["Content-MD5"]  # the prepared request's headers: bytes
    assert bytes(md5) == base64.b64encode(hashlib.md5(body).digest())


def test_a_store_that_cannot_be_reached_is_a_transient_error_for_every_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    s3 = S3(S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1))  # nothing listens
    url = S3Url("bucket", "x.jpg")
    for call in (
        lambda: s3.get(url),
        lambda: s3.put(url, b"1"),
        lambda: s3.put_file(url, io.BytesIO(b"1")),  # boto3's transfer raises it unwrapped
        lambda: list(s3.list(S3Url("bucket", ""))),
    ):
        with pytest.raises(S3Error) as err:
            call()
        assert err.value.code == "s3_unavailable" and err.value.transient
