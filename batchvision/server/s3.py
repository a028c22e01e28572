"""S3-compatible object storage: ``s3://bucket/key`` URLs listed, read and written.

One small surface over **boto3** (the AWS SDK for Python; see docs/guides/object-storage.md for
why boto3 rather than obstore or s3fs), used by the API (the first page of a prefix, the blob store), the
workers (the rest of a listing, images, results, blobs, the model repository) and the CLI's tools:

- :class:`S3Url`: ``s3://bucket/key`` parsed and checked (``bad_url``);
- :meth:`S3.list`: every object under a prefix, **streamed** one page (1,000 keys) at a time,
  so a prefix of millions of keys is never held at once;
- :meth:`S3.get`: an object's bytes, refused past a byte cap before it is read (``too_large``);
- :meth:`S3.put` / :meth:`S3.put_file`: **atomic** writes: a single ``PutObject`` or a multipart
  upload that S3 only makes visible when it is completed (an interrupted one is aborted), so a
  reader sees the whole object or none of it;
- retries: botocore's ``standard`` mode, exponential backoff with jitter on throttling
  (``SlowDown``, ``503``, ``ThrottlingException``, ``RequestLimitExceeded``), ``500``/``502``/``504``
  and connection errors, up to ``S3_MAX_ATTEMPTS`` calls per request;
- every failure a :class:`S3Error` whose ``code`` is the per-image or per-job error code:
  ``bucket_not_found``, ``object_not_found``, ``access_denied``, ``s3_throttled``,
  ``s3_unavailable``, ``s3_error``.

Credentials are never configured here: the SDK's default chain reads them (environment,
``~/.aws`` shared config and credentials files, web identity for Kubernetes service accounts,
ECS and EC2 instance roles). The endpoint is ``BATCHVISION_S3_ENDPOINT_URL``, else the SDK's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchvision.core.errors import BatchvisionError
from batchvision.core.manifest import MAX_URL_LENGTH, bucket_problem, key_problem
from batchvision.core.settings import Settings

log = logging.getLogger(__name__)

SCHEME = "s3://"
#: Error codes of S3 that mean "too many requests, slow down" (retried with backoff by botocore).
THROTTLING = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)
#: Above this size an upload goes in parts of this size (S3's minimum part is 5 MiB).
MULTIPART_BYTES = 16 * 1024 * 1024


#: The codes of a store that is throttling or unreachable (after botocore's retries): a wait,
#: not a fault of the request, so the API answers ``503`` with ``Retry-After``.
TRANSIENT_CODES = frozenset({"s3_throttled", "s3_unavailable"})
#: Reads of one object's body when it breaks off (botocore retries requests, not bodies).
BODY_READS = 3


class S3Error(BatchvisionError):
    """An S3 request that failed; ``code`` is the error code a job or an image reports. Its HTTP
    status is ``503`` for :data:`TRANSIENT_CODES`, else ``422``."""

    status = 422
    code = "s3_error"
    #: raised while an object's body was read (after the request itself succeeded)
    streaming = False

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message, code=code, details=details)
        if self.code in TRANSIENT_CODES:
            self.status = 503

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed (throttled or unreachable, after the retries)."""
        return self.code in TRANSIENT_CODES


class TransientS3Error(S3Error):
    """An :class:`S3Error` worth trying again soon: of :data:`TRANSIENT_CODES` (throttled,
    unreachable), or a worker's read of an upload cut short. A worker's task is retried with
    backoff on it."""


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``: a bucket and a key (or key prefix, possibly empty)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Url:
        """Split ``url``; :class:`S3Error` ``bad_url`` when it is not a usable ``s3://`` URL."""
        if not isinstance(url, str) or not url.startswith(SCHEME):
            raise S3Error(f"not an s3:// URL: {str(url)[:200]!r}", code="bad_url")
        if len(url) > MAX_URL_LENGTH:
            raise S3Error(f"URL longer than {MAX_URL_LENGTH} characters", code="bad_url")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
            raise S3Error(f"URL with control characters: {url[:200]!r}", code="bad_url")
        bucket, _, key = url[len(SCHEME) :].partition("/")
        problem = bucket_problem(bucket) or key_problem(key)
        if problem is not None:
            raise S3Error(f"{problem} (in {url[:200]!r})", code="bad_url")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Url:
        """The object ``name`` under this URL taken as a folder."""
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Url(self.bucket, prefix + name)

    def relative(self, key: str) -> str:
        """``key`` relative to this URL taken as a folder (a key outside it: unchanged)."""
        base = self.folder.key
        return key[len(base) :] if key.startswith(base) else key

    @property
    def folder(self) -> S3Url:
        """This URL as a folder prefix (ending in ``/`` unless it is the bucket's root)."""
        return self if not self.key or self.key.endswith("/") else S3Url(self.bucket, self.key + "/")


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower())


def is_s3_url(url: str) -> bool:
    return isinstance(url, str) and url.startswith(SCHEME)


@dataclass(frozen=True)
class S3Object:
    """One listed object."""

    key: str
    size: int
    etag: str = ""
    #: When it was last written (seconds since the epoch; 0: unknown).
    modified: float = 0.0


@dataclass(frozen=True)
class S3Config:
    """How to reach the store (from :class:`~batchvision.core.settings.Settings`)."""

    endpoint_url: str = ""
    region: str = ""
    addressing_style: str = "auto"
    max_attempts: int = 8
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_connections: int = 32

    @classmethod
    def from_settings(cls, s: Settings) -> S3Config:
        return cls(
            endpoint_url=s.s3_endpoint_url,
            region=s.s3_region,
            addressing_style=s.s3_addressing_style,
            max_attempts=s.s3_max_attempts,
            connect_timeout_s=s.fetch_connect_timeout_s,
            read_timeout_s=s.fetch_timeout_s,
            max_connections=max(10, s.fetch_threads * 2),
        )


_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"']+", re.IGNORECASE)
#: How urllib3 names the endpoint of a connection pool: ``HTTPConnectionPool(host='minio',
#: port=9000)``, without a scheme.
_POOL = re.compile(r"\bhost='[^']*'(?:,\s*port=\d+)?")


def _scrubbed(exc: BaseException) -> str:
    """``exc``'s text without the store's address in it (the URLs, credentials in them, and the
    host and port urllib3 names): what a job's caller may see."""
    return _POOL.sub("<the store's endpoint>", _URL.sub("<the store's endpoint>", str(exc)))


def _error(exc: BaseException, what: str) -> S3Error:
    """The :class:`S3Error` of a botocore exception, its code the one a job or image reports."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        EndpointConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
    )
    from urllib3.exceptions import HTTPError as TransportError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(err.get("Message", "") or code)
        if code == "PreconditionFailed" or status == 412:
            return S3Error(f"{what}: the object changed while it was read", code="object_changed")
        if code == "NoSuchBucket":
            return S3Error(f"{what}: the bucket does not exist", code="bucket_not_found")
        if code in ("NoSuchKey", "NotFound") or status == 404:
            return S3Error(f"{what}: no such object", code="object_not_found")
        if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
            status == 403
        ):
            return S3Error(f"{what}: access denied ({code or status})", code="access_denied")
        if code in THROTTLING or status in (429, 503):
            why = f"{what}: the store kept answering {code or status} (throttled)"
            return TransientS3Error(why, code="s3_throttled")
        if status >= 500:
            return TransientS3Error(f"{what}: the store answered {status} {code}", code="s3_unavailable")
        return S3Error(f"{what}: {code or status}: {message}"[:500], code="s3_error")
    if isinstance(exc, IncompleteReadError):
        why = f"{what}: the connection ended before the whole object ({_scrubbed(exc)})"
        return S3Error(why, code="incomplete_download")
    if isinstance(exc, NoCredentialsError):
        return S3Error(f"{what}: no credentials (environment, ~/.aws, or a role)", code="access_denied")
    # HTTPClientError: a read timeout, a connection closed or reset while the body streamed
    # (ConnectionClosedError, ResponseStreamingError); the rest is the transport's own.
    unreachable = (EndpointConnectionError, ConnectionError, HTTPClientError, TransportError, OSError)
    if isinstance(exc, unreachable):
        # The detail (the endpoint's address) is the operator's: the caller sees the kind of fault.
        log.warning("%s: the store cannot be reached: %s", what, exc)
        # Only the kind of fault: its text names the store's host in forms no pattern catches
        # (a certificate's name, a name that did not resolve, "Connection to <host> timed out").
        why = f"{what}: the store cannot be reached ({type(exc).__name__})"
        return TransientS3Error(why[:500], code="s3_unavailable")
    if isinstance(exc, BotoCoreError):
        log.warning("%s: %s", what, exc)
        return S3Error(f"{what}: {_scrubbed(exc)}"[:500], code="s3_error")
    raise exc


def _with_content_md5(request: Any, **_: Any) -> None:
    """Give a request the ``Content-MD5`` of its body (see :class:`S3`)."""
    body = request.body if isinstance(request.body, bytes) else str(request.body or "").encode()
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _retry_without_a_budget(client: Any, max_attempts: int) -> None:
    """botocore's standard retries, with every call given all of its ``max_attempts``.

    The standard mode also keeps a retry budget per client (500 tokens, 5 for each retry of a
    throttled call, won back only by calls that succeed): one client serves every fetch
    thread, so after about a hundred throttled retries no call was retried at all, and a
    prefix job's images ended as ``s3_throttled`` at the first ``SlowDown``, without a single
    backoff. Built as ``botocore.retries.standard.register_retry_handler`` builds it, with a
    budget that does not run out: each call's attempts and their backoff are the bound."""
    from botocore.retries import quota, standard

    name = client.meta.service_model.service_id.hyphenize()
    events = client.meta.events
    events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")
    adapter = standard.RetryEventAdapter()
    throttling = standard.ThrottlingErrorDetector(adapter)
    budget = standard.RetryQuotaChecker(quota.RetryQuota(initial_capacity=sys.maxsize), throttling)
    handler = standard.RetryHandler(
        retry_policy=standard.RetryPolicy(
            retry_checker=standard.StandardRetryConditions(max_attempts=max_attempts),
            retry_backoff=standard.ExponentialBackoff(service_name=name, throttling_detector=throttling),
        ),
        retry_event_adapter=adapter,
        retry_quota=budget,
        service_name=name,
    )
    events.register(f"after-call.{name}", budget.release_retry_quota)
    events.register(f"needs-retry.{name}", handler.needs_retry, unique_id=f"retry-config-{name}")


class S3:
    """A thread-safe S3 client (boto3 clients are; one per process is enough)."""

    def __init__(self, config: S3Config = S3Config()) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # the API image and the workers' have it; a bare install may not
            raise S3Error(
                "s3:// URLs need boto3: pip install 'batchvision[s3]'", code="s3_unsupported"
            ) from exc
        self.config = config
        style = config.addressing_style
        if style == "auto" and config.endpoint_url:
            # S3-compatible stores (MinIO, Ceph, moto) are usually reached by path, not by a
            # virtual host name per bucket.
            style = "path"
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            region_name=config.region or None,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": config.max_attempts},
                s3={"addressing_style": style},
                # Checksums only where the API requires them: many S3-compatible stores refuse
                # the CRC32 trailers botocore adds to every upload by default.
                request_checksum_calculation="when_required" if config.endpoint_url else "when_supported",
                response_checksum_validation="when_required" if config.endpoint_url else "when_supported",
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                max_pool_connections=config.max_connections,
            ),
        )
        _retry_without_a_budget(self._client, config.max_attempts)
        # DeleteObjects must carry a checksum; botocore sends a CRC32 where S3 used to get
        # Content-MD5, which S3-compatible stores of before 2025 (MinIO, Ceph) still require
        # (MissingContentMD5): every delete, and so every output prefix's test write, failed.
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _with_content_md5)

    @classmethod
    def from_settings(cls, s: Settings) -> S3:
        return cls(S3Config.from_settings(s))

    @property
    def client(self) -> Any:
        """The boto3 client (for what this class does not wrap)."""
        return self._client

    def close(self) -> None:
        self._client.close()

    # -- reading ----------------------------------------------------------------------------

    def list(self, url: S3Url, *, page_size: int = 1000, after: str = "") -> Iterator[S3Object]:
        """Every object under ``url``'s key prefix (those after the key ``after``, if given),
        in key order, one page at a time (folder markers, keys ending in ``/``, left out).
        Raises :class:`S3Error` (``bucket_not_found``, ``access_denied``...) at the page that
        failed."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": url.bucket, "Prefix": url.key, "MaxKeys": page_size}
            if token:
                kwargs["ContinuationToken"] = token
            elif after:
                kwargs["StartAfter"] = after
            try:
                page = self._client.list_objects_v2(**kwargs)
            except Exception as exc:
                raise _error(exc, f"listing {url}") from exc
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):
                    etag = str(item.get("ETag", "")).strip('"')
                    stamp = item.get("LastModified")
                    modified = stamp.timestamp() if stamp is not None else 0.0
                    yield S3Object(item["Key"], int(item.get("Size", 0)), etag, modified)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def body_broke(self, exc: S3Error, attempt: int, since: float) -> float | None:
        """How long to wait before reading again an object whose body broke off with ``exc``
        (read ``attempt`` of :data:`BODY_READS`, the first begun at ``since``, a monotonic
        time), or ``None`` when it must not be read again: another error, the reads spent, or
        ``read_timeout_s`` passed."""
        broke = exc.streaming and (exc.transient or exc.code == "incomplete_download")
        wait = min(2.0, 0.1 * 2**attempt)
        late = time.monotonic() + wait - since > self.config.read_timeout_s
        return None if not broke or attempt == BODY_READS or late else wait

    def get(self, url: S3Url, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ``too_large`` (:class:`S3Error`, 422) before reading when it is
        larger than ``max_bytes``. botocore retries the request, not the read of its body: a
        body that breaks off (a reset connection) is asked for again, up to
        :data:`BODY_READS` times in all, with backoff, while ``read_timeout_s`` has not passed
        since the first read began (a body that stalls is not waited for again and again)."""
        start = time.monotonic()
        for attempt in range(1, BODY_READS + 1):
            try:
                return self._get_once(url, max_bytes)
            except S3Error as exc:
                wait = self.body_broke(exc, attempt, start)
                if wait is None:
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _get_once(self, url: S3Url, max_bytes: int | None) -> bytes:
        try:
            resp = self._client.get_object(Bucket=url.bucket, Key=url.key)
        except Exception as exc:
            raise _error(exc, str(url)) from exc
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength", 0) or 0)
            if max_bytes is not None and size > max_bytes:
                raise S3Error(f"{url}: {size} bytes, over the limit of {max_bytes}", code="too_large")
            try:
                return bytes(body.read())
            except Exception as exc:
                error = _error(exc, str(url))
                error.streaming = True
                raise error from exc
        finally:
            body.close()

    def lines(self, url: S3Url) -> Iterator[bytes]:
        """The object's lines (without their ends), streamed: a large text object is never
        held whole. Raises :class:`S3Error` (``not_found``...) before the first line or where
        the read broke off."""
        try:
            resp = self._client.get_object(Bucket=url.bucket, Key=url.key)
        except Exception as exc:
            raise _error(exc, str(url)) from exc
        body = resp["Body"]
        try:
            yield from body.iter_lines()
        except Exception as exc:
            error = _error(exc, str(url))
            error.streaming = True
            raise error from exc
        finally:
            body.close()

    def download(self, url: S3Url, path: str | Path, expected: S3Object) -> None:
        """Copy the object ``expected`` describes (as listed) to a local file, checked: the read
        is conditional on the listed ETag (``object_changed`` when it was replaced since), the
        bytes written must be the listed size (``incomplete_download``), and when the ETag is
        the content's MD5 (a single-part upload without KMS or customer keys) it must match
        (``checksum_mismatch``). A failed copy may leave a partial file behind: write to a
        temporary name and rename it once this returns."""
        kwargs: dict[str, Any] = {"Bucket": url.bucket, "Key": url.key}
        if expected.etag:
            kwargs["IfMatch"] = f'"{expected.etag}"'
        try:
            resp = self._client.get_object(**kwargs)
        except Exception as exc:
            raise _error(exc, str(url)) from exc
        body = resp["Body"]
        # SSE-KMS and SSE-C objects have ETags that are not their MD5; multipart ones "<md5>-<n>".
        plain = resp.get("ServerSideEncryption") in (None, "AES256") and "SSECustomerAlgorithm" not in resp
        digest = hashlib.md5(usedforsecurity=False) if plain and _is_md5(expected.etag) else None
        written = 0
        try:
            with open(path, "wb") as fh:
                for chunk in body.iter_chunks(1024 * 1024):
                    fh.write(chunk)
                    written += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
        except OSError:  # the local disk's problem (full, read-only), not the store's
            raise
        except Exception as exc:
            raise _error(exc, str(url)) from exc
        finally:
            body.close()
        if written != expected.size:
            raise S3Error(f"{url}: {written} bytes read, {expected.size} listed", code="incomplete_download")
        if digest is not None and digest.hexdigest() != expected.etag:
            raise S3Error(f"{url}: the content does not match its ETag", code="checksum_mismatch")

    def head(self, url: S3Url) -> S3Object | None:
        """The object's size and ETag, ``None`` when there is none."""
        try:
            resp = self._client.head_object(Bucket=url.bucket, Key=url.key)
        except Exception as exc:
            err = _error(exc, str(url))
            if err.code == "object_not_found":
                return None
            raise err from exc
        return S3Object(url.key, int(resp.get("ContentLength", 0)), str(resp.get("ETag", "")).strip('"'))

    # -- writing ----------------------------------------------------------------------------

    def put(self, url: S3Url, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write an object in one ``PutObject``: it appears whole or not at all."""
        try:
            self._client.put_object(Bucket=url.bucket, Key=url.key, Body=data, ContentType=content_type)
        except Exception as exc:
            raise _error(exc, f"writing {url}") from exc

    def put_file(self, url: S3Url, fh: IO[bytes], content_type: str = "application/octet-stream") -> None:
        """Write an object from an open file: one ``PutObject`` up to :data:`MULTIPART_BYTES`,
        a multipart upload above (S3 shows the object only once every part is in; a failed
        upload is aborted, its parts discarded)."""
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        try:
            self._client.upload_fileobj(
                fh, url.bucket, url.key, ExtraArgs={"ContentType": content_type}, Config=config
            )
        except Exception as exc:
            # boto3 wraps a failed upload's ClientError in S3UploadFailedError (as its context);
            # connection errors come through as they are.
            cause = exc.__cause__ or exc.__context__
            inner = cause if isinstance(exc, S3UploadFailedError) and isinstance(cause, Exception) else exc
            raise _error(inner, f"writing {url}") from exc

    def delete(self, urls: Sequence[S3Url]) -> None:
        """Delete objects (1,000 per request); missing ones are no error. A key the store
        refuses to delete (``Errors`` in the reply of ``DeleteObjects``, which answers ``200``
        for the request) is an :class:`S3Error` naming the first such key, after every batch
        was sent."""
        by_bucket: dict[str, list[str]] = {}
        for u in urls:
            by_bucket.setdefault(u.bucket, []).append(u.key)
        failed: list[tuple[str, dict[str, Any]]] = []
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                objects = [{"Key": k} for k in keys[start : start + 1000]]
                try:
                    reply = self._client.delete_objects(
                        Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
                    )
                except Exception as exc:
                    raise _error(exc, f"deleting from s3://{bucket}/") from exc
                failed += [(bucket, err) for err in reply.get("Errors") or ()]
        if failed:
            bucket, first = failed[0]
            raise _key_error(bucket, first, len(failed))


def _key_error(bucket: str, err: dict[str, Any], count: int) -> S3Error:
    """The :class:`S3Error` of one key's entry in a ``DeleteObjects`` reply's ``Errors``
    (``count``: how many keys failed)."""
    from botocore.exceptions import ClientError

    code = str(err.get("Code", ""))
    # The reply has no status per key: the codes _error maps by status get theirs back.
    status = {"InternalError": 500, "ServiceUnavailable": 503}.get(code, 0)
    reply: Any = {
        "Error": {"Code": code, "Message": str(err.get("Message", ""))},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    more = f" (and {count - 1} more keys)" if count > 1 else ""
    return _error(ClientError(reply, "DeleteObjects"), f"deleting s3://{bucket}/{err.get('Key', '')}{more}")


_shared: dict[S3Config, S3] = {}
_shared_lock = threading.Lock()


def shared(config: S3Config) -> S3:
    """One :class:`S3` per configuration in this process (its connection pool is shared)."""
    with _shared_lock:
        if config not in _shared:
            _shared[config] = S3(config)
        return _shared[config]
