"""Python client for the batchvision HTTP API (the CLI is built on it).

Every call survives a blip: the one retry policy of :mod:`batchvision.client.retry` applies
to each of them (connection errors, ``408``/``429``/``502``/``503``/``504``, with ``Retry-After``,
bodies cut off mid-way), for at most ``retry_for_s`` seconds per call.

Answers are typed: the pydantic documents of :mod:`batchvision.core.documents`, the same
definitions the API validates with and its OpenAPI document is generated from (``Job``,
``JobAccepted``, ``ResultRow``, ``FileList``, ``ClassifyResult``).
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import encode_multipart_formdata

from batchvision.client.bulk import FolderUpload, submit_folder
from batchvision.client.errors import ApiError
from batchvision.client.retry import Budget, RetryPolicy, resent_after_arrival
from batchvision.core.documents import (
    FINAL_STATUSES,
    ClassifyResult,
    FileList,
    Job,
    JobAccepted,
    ResultRow,
    Retried,
)
from batchvision.core.job_list import JobList
from batchvision.core.manifest import UrlEntry
from batchvision.core.model_documents import ModelForgotten, ModelList, ReloadAccepted

#: The final job statuses (also ``Job.final``).
FINAL = frozenset(str(s) for s in FINAL_STATUSES)

#: What a broken connection looks like once the response has started (headers received).
#: The longest ``wait`` the API takes (``GET /v1/jobs/{id}?wait=``).
MAX_WAIT_S = 3600.0

BODY_ERRORS = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


def _permanent(exc: BaseException) -> bool:
    """A connection error no retry can mend: a certificate that does not verify, TLS spoken
    to a port that does not (``WRONG_VERSION_NUMBER``). Other TLS errors, such as a handshake
    a restarting proxy cut (``UNEXPECTED_EOF``), pass: they are retried."""
    if not isinstance(exc, requests.exceptions.SSLError):
        return False
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text


#: What the API answers a client's calls with (JSON documents, results as JSON Lines or CSV).
ANSWER_TYPES = frozenset({"application/json", "application/x-ndjson", "text/csv"})


class Client:
    """Submit images, poll jobs, fetch results.

    ``api_url`` and ``api_key`` default to ``BATCHVISION_API_URL`` / ``BATCHVISION_API_KEY``.
    ``timeout`` bounds each HTTP exchange (the read; connecting gets at most 10 s);
    ``retry_for_s`` bounds the retries of one call (see :mod:`batchvision.client.retry`).
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        retry_for_s: float = 120.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        given = api_url or os.environ.get("BATCHVISION_API_URL") or "http://127.0.0.1:8000"
        parts = urlsplit(given)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"API URL {given!r}: give it as http://host:port or https://host "
                "(--api-url, BATCHVISION_API_URL)"
            )
        self.api_url = given.rstrip("/")
        self.policy = policy or RetryPolicy(retry_for_s=retry_for_s)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.policy.transport())
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        key = api_key if api_key is not None else os.environ.get("BATCHVISION_API_KEY", "")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, budget: Budget, **kw: Any) -> requests.Response:
        """One request with the transport's retries (sharing ``budget``'s deadline); the body
        is left unread. Raises :class:`ApiError` for an error status."""
        read_timeout = kw.pop("timeout", self.timeout)
        if "files" in kw:
            kw = _streamed_multipart(kw)
        with budget.active():
            resp = self.session.request(
                method,
                self.api_url + path,
                timeout=(min(10.0, read_timeout), read_timeout),
                stream=True,
                **kw,
            )
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except (ValueError, *BODY_ERRORS):
                body = {"error": {"code": "http_error", "message": f"HTTP {resp.status_code}"}}
            finally:
                resp.close()
            err = ApiError(resp.status_code, body)
            err.retry_after = resp.headers.get("Retry-After")
            retries = getattr(resp.raw, "retries", None)
            err.resent = retries is not None and resent_after_arrival(retries.history)
            raise err
        if not _bodiless(method, resp.status_code) and (
            "Content-Length" not in resp.headers
            and "chunked" not in resp.headers.get("Transfer-Encoding", "")
        ):
            # Every answer of the API is framed; one that is not had its headers cut off, and its
            # "body" would end wherever the connection broke (an empty results file, say).
            resp.close()
            raise requests.exceptions.ChunkedEncodingError("answer cut off in its headers")
        kind = resp.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if not _bodiless(method, resp.status_code) and kind not in ANSWER_TYPES:
            # A login page, a captive portal, another service at --api-url: not worth retrying,
            # and never to be parsed as results.
            resp.close()
            raise ApiError(
                resp.status_code,
                {
                    "error": {
                        "code": "not_the_api",
                        "message": f"the answer is {kind or 'untyped'}, not the batchvision API's "
                        f"(is {self.api_url} the API's address?)",
                    }
                },
            )
        return resp

    def _json(self, method: str, path: str, *, resend: bool = True, **kw: Any) -> Any:
        """A request whose JSON answer is read whole, retried under one budget (``resend``:
        see :class:`~batchvision.client.retry.Budget`)."""
        budget = self.policy.budget(resend=resend)
        while True:
            try:
                with self._send(method, path, budget, **kw) as resp:
                    return resp.json()
            except ApiError as exc:
                # An earlier try with the same Idempotency-Key is still being processed (its
                # connection broke, the server carries on): ask again shortly.
                if exc.code != "idempotency_conflict" or not budget.pause(_seconds(exc.retry_after)):
                    raise
            except (*BODY_ERRORS, ValueError) as exc:
                if _permanent(exc):
                    raise
                # The answer broke off after its headers began: a body cut short, or headers
                # cut before their end, which leaves a body that is not the JSON it must be.
                # Either way the request arrived: a call that must not repeat stops here.
                if not budget.resend or not budget.pause():
                    raise

    # -- jobs ----------------------------------------------------------------------------------

    def submit_files(self, files: Iterable[tuple[str, bytes] | str | Path], **options: Any) -> JobAccepted:
        """Submit images as one job; items are paths or ``(filename, bytes)`` pairs.
        ``options``: ``model`` (``name`` or ``name:version``), ``top_k``, ``min_score``,
        ``priority`` (0 lowest to 9 highest, default 5; at most the API key's maximum)."""
        params = job_options(**options)
        body = self._json("POST", "/v1/jobs", params=params, files=_parts(files), headers=_idempotency())
        return JobAccepted.model_validate(body)

    def open_job(
        self, expected: int | None = None, callback_url: str | None = None, **options: Any
    ) -> JobAccepted:
        """Open a job for an upload in parts (``callback_url``: see :meth:`submit_urls`;
        ``options``: see :meth:`submit_files`)."""
        body: dict[str, Any] = {"expected": expected}
        if callback_url is not None:
            body["callback_url"] = callback_url
        params = job_options(**options)
        return JobAccepted.model_validate(
            self._json("POST", "/v1/jobs", params=params, json=body, headers=_idempotency())
        )

    # -- images by URL, completion webhooks ---------------------------------------------

    def submit_urls(
        self,
        urls: Iterable[str | tuple[str, str | None] | UrlEntry | Mapping[str, Any]],
        callback_url: str | None = None,
        **options: Any,
    ) -> JobAccepted:
        """Submit images by URL as one job (the workers fetch them); items are URLs,
        ``(url, filename)`` pairs, ``{url, filename, id, columns}`` mappings or the entries of a
        read manifest (:func:`batchvision.core.manifest.read_file`), whose ids and columns come
        back beside the predictions. ``callback_url`` gets one signed POST when the job is final
        (check it with the secret of :meth:`webhook_secret`)."""
        body: dict[str, Any] = {"urls": [_url_item(u) for u in urls]}
        if callback_url is not None:
            body["callback_url"] = callback_url
        params = job_options(**options)
        return JobAccepted.model_validate(
            self._json("POST", "/v1/jobs", params=params, json=body, headers=_idempotency())
        )

    def webhook_secret(self) -> str:
        """The secret that signs this API key's webhooks (``Batchvision-Signature``)."""
        return str(self._json("GET", "/v1/webhook-secret")["secret"])

    def add_part(self, job_id: str, files: list[tuple[str, bytes]]) -> JobAccepted:
        """Upload one part; file names are relative paths (the idempotency key)."""
        return JobAccepted.model_validate(self._json("POST", f"/v1/jobs/{job_id}/files", files=_parts(files)))

    def seal(self, job_id: str) -> Job:
        """The upload is complete (sealing again changes nothing)."""
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/seal"))

    def files(self, job_id: str) -> FileList:
        """Relative paths the service already has for ``job_id`` (``.files``)."""
        return FileList.model_validate(self._json("GET", f"/v1/jobs/{job_id}/files"))

    def submit_folder(self, *paths: str | Path, **kw: Any) -> FolderUpload:
        """Upload every image under ``paths`` to one job (:func:`~batchvision.client.bulk.submit_folder`)."""
        return submit_folder(self, [Path(p) for p in paths], **kw)

    def classify(
        self, files: Iterable[tuple[str, bytes] | str | Path], timeout: float = 30.0, **options: Any
    ) -> ClassifyResult | JobAccepted:
        """Submit and wait server-side (``POST /v1/classify``): the finished job with its
        ``results``, or, past ``timeout``, the accepted job to poll. ``options``: see
        :meth:`submit_files`."""
        body = self._json(
            "POST",
            "/v1/classify",
            params={"timeout": timeout, **job_options(**options)},
            files=_parts(files),
            headers=_idempotency(),
            timeout=timeout + 30,
        )
        if isinstance(body, dict) and "results" in body:
            return ClassifyResult.model_validate(body)
        return JobAccepted.model_validate(body)

    def status(self, job_id: str, wait: float = 0.0) -> Job:
        """The job; with ``wait`` (seconds), once it is final or ``wait`` passed (a long poll)."""
        if wait <= 0:
            return Job.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))
        params = {"wait": f"{wait:g}"}
        return Job.model_validate(
            self._json("GET", f"/v1/jobs/{job_id}", params=params, timeout=wait + self.timeout)
        )

    def jobs(
        self,
        *,
        status: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobList:
        """``GET /v1/jobs``: a page of this key's jobs, newest first; pass ``next_cursor`` of a
        page as ``cursor`` for the next one (``None`` once no job is left)."""
        query = {
            "status": status,
            "created_after": created_after,
            "created_before": created_before,
            "limit": limit,
            "cursor": cursor,
        }
        params = {k: v for k, v in query.items() if v is not None}
        return JobList.model_validate(self._json("GET", "/v1/jobs", params=params))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job is final (or ``timeout``); ``on_progress(status)`` each poll.

        Each poll is a long poll of up to ``poll_s`` (``GET /v1/jobs/{id}?wait=``): the API
        answers as soon as the job is final, so no poll sleeps past its end. (A server that
        predates ``wait`` is polled every ``poll_s``.) Each poll is one call with its own retry
        budget: an outage shorter than ``retry_for_s`` (a Redis restart behind the API, a
        dropped connection) only delays it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        long_poll = True
        while True:
            started = time.monotonic()
            left = poll_s if deadline is None else min(poll_s, deadline - started)
            hold = min(max(left, 0.0), MAX_WAIT_S) if long_poll else 0.0
            try:
                st = self.status(job_id, wait=hold)
            except ApiError as exc:
                if not (hold and _refuses_long_polls(exc)):
                    raise
                long_poll = False  # an API without long polls: sleep between polls
                continue
            if on_progress is not None:
                on_progress(st)
            if st.final:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: {st}")
            # What the poll did not hold (an API without long polls, or one whose
            # BATCHVISION_SYNC_TIMEOUT_S caps the wait): never a busy loop.
            time.sleep(max(0.0, poll_s - (time.monotonic() - started)))

    def results(self, job_id: str) -> list[ResultRow]:
        """Every result row, in upload order."""
        return list(self.iter_results(job_id))

    def iter_results(self, job_id: str) -> Iterator[ResultRow]:
        """Stream rows without holding the whole result set (JSON Lines).

        A stream cut off mid-way is resumed after the last complete row (``offset``), so
        every row is yielded exactly once. The retry budget starts again after each stream that
        brought rows: a long stream (or a slow consumer) cut late is still resumed.
        """
        budget = self.policy.budget()
        offset = resumed_at = 0
        path = f"/v1/jobs/{job_id}/results"
        while True:
            try:
                with self._send("GET", path, budget, params={"format": "jsonl", "offset": offset}) as resp:
                    for line in resp.iter_lines():
                        if line:
                            row = ResultRow.model_validate_json(line)
                            offset += 1
                            yield row
                return
            except BODY_ERRORS as exc:
                if _permanent(exc):
                    raise
                if offset > resumed_at:  # progress: a fresh budget (rows are finite: this ends)
                    budget, resumed_at = self.policy.budget(), offset
                if not budget.pause():
                    raise

    def download(self, job_id: str, out: Path, fmt: str) -> int:
        """Write results to ``out`` in ``fmt`` (csv, jsonl or json); returns bytes written.

        The file is written beside ``out`` and renamed into place once complete; a stream cut
        off mid-way is fetched again from the start, with a fresh retry budget when it got
        further than any try before.
        """
        out = Path(out)
        tmp = out.with_name(f".{out.name}.part")
        budget = self.policy.budget()
        furthest = n = 0
        try:
            while True:
                try:
                    n = 0
                    with (
                        self._send(
                            "GET", f"/v1/jobs/{job_id}/results", budget, params={"format": fmt}
                        ) as resp,
                        open(tmp, "wb") as fh,
                    ):
                        for chunk in resp.iter_content(64 * 1024):
                            n += fh.write(chunk)
                    os.replace(tmp, out)
                    return n
                except BODY_ERRORS as exc:
                    if _permanent(exc):
                        raise
                    if n > furthest:  # progress (the file is finite: this ends)
                        budget, furthest = self.policy.budget(), n
                    if not budget.pause():
                        raise
        except BaseException:  # no partial file is left behind, whatever ended the download
            tmp.unlink(missing_ok=True)
            raise

    # -- models ------------------------------------------------------------------------

    def models(self) -> ModelList:
        """``GET /v1/models``: the default model and every model's versions, live version,
        input size, classes and workers."""
        return ModelList.model_validate(self._json("GET", "/v1/models"))

    def reload_model(self, name: str, version: int | str | None = None) -> ReloadAccepted:
        """Ask the workers to load ``name``'s new version, or make ``version`` live (a number,
        or ``"latest"``); needs an admin key. Returns at once: see :meth:`models`."""
        body = {} if version is None else {"version": version}
        return ReloadAccepted.model_validate(self._json("POST", f"/v1/models/{name}/reload", json=body))

    def forget_model(self, name: str) -> ModelForgotten:
        """Remove ``name``, which no worker serves any more, from the registry (new jobs naming
        it are refused); needs an admin key. ``ApiError`` 409 while a worker serves it.

        A ``404`` to a repeat whose first try may have arrived (its answer was lost) means that
        try forgot the model: success, as for :meth:`delete`."""
        try:
            return ModelForgotten.model_validate(self._json("DELETE", f"/v1/models/{name}"))
        except ApiError as exc:
            if not _gone_by_an_earlier_try(exc):
                raise
            return ModelForgotten(model=name)

    def cancel(self, job_id: str) -> Job:
        """Cancel what is not classified yet (cancelling again changes nothing); the job and its
        results so far stay readable."""
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> Retried:
        """Queue again the images of a finished job whose errors are retryable; ``requeued``
        says how many, ``not_requeued`` those whose input is gone. ``ApiError`` 409
        (``job_running``) while the job runs.

        Not re-sent once a try may have reached the API (a repeat would find the job running
        again): a lost answer raises a ``requests.RequestException``, a gateway's ``502``/``504``
        an ``ApiError``; :meth:`status` tells whether the images were queued again. A ``409
        job_running`` after such a repeat may mean the first try did queue them."""
        return Retried.model_validate(self._json("POST", f"/v1/jobs/{job_id}/retry", resend=False))

    def delete(self, job_id: str) -> None:
        """Delete the job: what is queued is canceled, then the job, its results and its
        uploads are removed (every later request about it gets 404).

        A ``404`` to a repeat whose first try may have arrived (its answer was lost) means
        that try deleted the job: that is success, not an error."""
        try:
            self._send("DELETE", f"/v1/jobs/{job_id}", self.policy.budget()).close()
        except ApiError as exc:
            if not _gone_by_an_earlier_try(exc):
                raise


def _gone_by_an_earlier_try(exc: ApiError) -> bool:
    """Whether a ``DELETE``'s ``404`` answered a repeat whose first try may have arrived: that
    try removed what the repeat no longer finds."""
    return exc.status == 404 and exc.resent


def job_options(
    model: str | None = None,
    top_k: int | None = None,
    min_score: float | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """The query parameters of per-job options; unknown names are a ``TypeError``."""
    given = {"model": model, "top_k": top_k, "min_score": min_score, "priority": priority}
    return {k: v for k, v in given.items() if v is not None}


def _bodiless(method: str, status: int) -> bool:
    """Whether an answer has no body by definition (RFC 9110: to ``HEAD``, ``1xx``, ``204``,
    ``304``), and so no framing headers either: ``DELETE`` answers ``204``."""
    return method == "HEAD" or status < 200 or status in (204, 304)


def _refuses_long_polls(exc: ApiError) -> bool:
    """Whether ``exc`` is an API that predates long polls refusing ``?wait=``: a ``400
    bad_parameter`` about that parameter (any other refusal is the caller's to see)."""
    if exc.status != 400 or exc.code != "bad_parameter":
        return False
    if isinstance(exc.details, list) and exc.details:
        return any(isinstance(d, dict) and d.get("field") == "wait" for d in exc.details)
    return "'wait'" in str(exc)


def _url_item(item: str | tuple[str, str | None] | UrlEntry | Mapping[str, Any]) -> str | dict[str, Any]:
    """One item of a URL job's ``urls``, as the API takes it."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, UrlEntry):
        doc = {
            "url": item.url,
            "filename": item.filename,
            "id": item.id,
            "columns": dict(item.columns) or None,
        }
        return {k: v for k, v in doc.items() if v is not None}
    url, filename = item
    return {"url": url, **({"filename": filename} if filename else {})}


def _idempotency() -> dict[str, str]:
    """A fresh ``Idempotency-Key`` for one logical create: every retry of it sends the same
    key, so the API returns the job of the first try instead of making a second one."""
    return {"Idempotency-Key": uuid.uuid4().hex}


def _seconds(retry_after: str | None) -> float | None:
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None


def _streamed_multipart(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with its multipart ``files`` encoded into a file object. urllib3 sends a file
    object in blocks, so the socket's timeout (the connect timeout while a request is sent)
    limits each stall; a ``bytes`` body goes in one ``sendall``, which would have to finish
    within that timeout: a 32 MB part over a slow uplink could then never be sent. A new file
    object per call: each re-send starts from the first byte."""
    if "data" in kw:
        raise TypeError("a multipart request takes files= or data=, not both")
    kw = dict(kw)
    body, content_type = encode_multipart_formdata(kw.pop("files"))
    kw["headers"] = {**(kw.get("headers") or {}), "Content-Type": content_type}
    kw["data"] = io.BytesIO(body)
    return kw


def _parts(files: Iterable[tuple[str, bytes] | str | Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` parts from paths or ``(filename, bytes)`` pairs."""
    out = []
    for item in files:
        name, data = (Path(item).name, Path(item).read_bytes()) if isinstance(item, (str, Path)) else item
        out.append(("files", (name, data, "application/octet-stream")))
    return out
