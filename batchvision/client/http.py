"""Python client for the batchvision HTTP API (the CLI is built on it)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

from batchvision.client.errors import ApiError

FINAL = {"succeeded", "partial", "failed", "canceled"}


class Client:
    """Submit images, poll jobs, fetch results.

    ``api_url`` and ``api_key`` default to ``BATCHVISION_API_URL`` / ``BATCHVISION_API_KEY``.
    """

    def __init__(self, api_url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.api_url = (api_url or os.environ.get("BATCHVISION_API_URL") or "http://127.0.0.1:8000").rstrip(
            "/"
        )
        self.session = requests.Session()
        key = api_key if api_key is not None else os.environ.get("BATCHVISION_API_KEY", "")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        resp = self.session.request(
            method, self.api_url + path, timeout=kw.pop("timeout", self.timeout), **kw
        )
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"error": {"code": "http_error", "message": resp.text[:200]}}
            err = ApiError(resp.status_code, body)
            err.retry_after = resp.headers.get("Retry-After")
            raise err
        return resp

    def submit_files(self, files: Iterable[tuple[str, bytes] | str | Path]) -> dict[str, Any]:
        """Submit images as one job; items are paths or ``(filename, bytes)`` pairs."""
        return dict(self._request("POST", "/v1/jobs", files=_parts(files)).json())

    def open_job(self, expected: int | None = None) -> dict[str, Any]:
        """Open a job for an upload in parts."""
        return dict(self._request("POST", "/v1/jobs", json={"expected": expected}).json())

    def add_part(self, job_id: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Upload one part; file names are relative paths (the idempotency key)."""
        return dict(self._request("POST", f"/v1/jobs/{job_id}/files", files=_parts(files)).json())

    def seal(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/jobs/{job_id}/seal").json())

    def files(self, job_id: str) -> list[str]:
        """Relative paths the service already has for ``job_id``."""
        return list(self._request("GET", f"/v1/jobs/{job_id}/files").json()["files"])

    def submit_folder(self, *paths: str | Path, **kw: Any) -> dict[str, Any]:
        """Upload every image under ``paths`` to one job (:func:`~batchvision.client.bulk.submit_folder`)."""
        from batchvision.client.bulk import submit_folder

        return submit_folder(self, [Path(p) for p in paths], **kw)

    def classify(
        self, files: Iterable[tuple[str, bytes] | str | Path], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Submit and wait server-side (``POST /v1/classify``)."""
        resp = self._request(
            "POST", "/v1/classify", params={"timeout": timeout}, files=_parts(files), timeout=timeout + 30
        )
        return dict(resp.json())

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}").json())

    def wait(
        self, job_id: str, timeout: float | None = None, poll_s: float = 0.5, on_progress: Any = None
    ) -> dict[str, Any]:
        """Poll until the job is final (or ``timeout``); ``on_progress(status)`` each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if on_progress is not None:
                on_progress(st)
            if st["status"] in FINAL:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: {st}")
            time.sleep(poll_s)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Every result row, in upload order."""
        return list(self.iter_results(job_id))

    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Stream rows without holding the whole result set (JSON Lines)."""
        import json

        resp = self._request("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}, stream=True)
        for line in resp.iter_lines():
            if line:
                yield json.loads(line)

    def download(self, job_id: str, out: Path, fmt: str) -> int:
        """Write results to ``out`` in ``fmt`` (csv, jsonl or json); returns bytes written."""
        resp = self._request("GET", f"/v1/jobs/{job_id}/results", params={"format": fmt}, stream=True)
        n = 0
        with open(out, "wb") as fh:
            for chunk in resp.iter_content(64 * 1024):
                n += fh.write(chunk)
        return n

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}").json())


def _parts(files: Iterable[tuple[str, bytes] | str | Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` parts from paths or ``(filename, bytes)`` pairs."""
    out = []
    for item in files:
        name, data = (Path(item).name, Path(item).read_bytes()) if isinstance(item, (str, Path)) else item
        out.append(("files", (name, data, "application/octet-stream")))
    return out
