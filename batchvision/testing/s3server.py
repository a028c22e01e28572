"""A private S3-compatible endpoint for the tests and benchmarks: ``moto`` in server mode (a real
HTTP server in its own process, on a free loopback port), and an HTTP proxy in front of it that
answers some requests the way a struggling or locked-down S3 does::

    with MotoServer() as s3:                 # started, answering HTTP
        s3.client().create_bucket(Bucket="in")
        with S3FaultProxy(s3.url) as proxy:  # throttles, denies, on rules the test sets
            proxy.fail("GET", "/in/", 503, "SlowDown", times=3)
            ...                              # point BATCHVISION_S3_ENDPOINT_URL at proxy.url

Credentials: moto accepts any; :data:`CREDENTIALS` are the ones the tests put in the
environment of the processes they start (the SDK's own variables).
"""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

import urllib3

from batchvision.cli.redis_server import free_port

#: What a test process needs to reach the endpoint the SDK's way (and no ~/.aws of the machine).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class MotoServer:
    """``moto_server`` on ``127.0.0.1:<free port>`` in a process of its own."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        http = urllib3.PoolManager()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    http.request("GET", f"{self.url}/moto-api/", timeout=1.0, retries=False)
                    return self
                except urllib3.exceptions.HTTPError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"moto_server exited ({self.proc.returncode})") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"moto_server on port {self.port} did not answer") from None
                    time.sleep(0.1)
        finally:
            http.clear()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset endpoint)."""
        urllib3.request("POST", f"{self.url}/moto-api/reset", timeout=10.0)

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client of this server (path-style addressing, the test credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=endpoint or self.url, config=Config(s3={"addressing_style": "path"}))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class _Rule:
    method: str
    path: re.Pattern[str]
    status: int  # 0: forwarded, cut half-way (:meth:`S3FaultProxy.cut`)
    code: str
    times: int  # answers left; -1: always


_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{code} (test proxy)</Message><RequestId>0</RequestId></Error>"
)


class S3FaultProxy:
    """An HTTP proxy to an S3 endpoint that answers requests matching a rule with an S3 error
    (``503 SlowDown``, ``403 AccessDenied``...) instead of forwarding them; ``hits`` counts the
    answers each rule gave."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.rules: list[_Rule] = []
        self.hits: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._http = urllib3.PoolManager(maxsize=32)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail(self, method: str, path: str, status: int, code: str, times: int = -1) -> None:
        """Answer ``method`` requests whose path matches the regular expression ``path`` with
        ``status`` and the S3 error ``code``, ``times`` times (-1: until :meth:`clear`)."""
        with self._lock:
            self.rules.append(_Rule(method.upper(), re.compile(path), status, code, times))

    def cut(self, method: str, path: str, times: int = -1) -> None:
        """Forward matching requests but send only half of the answer's body, then close the
        connection (a reset while an object streams)."""
        self.fail(method, path, 0, "", times)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _match(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.times != 0 and rule.method in (method, "*") and rule.path.search(path):
                    if rule.times > 0:
                        rule.times -= 1
                    key = (rule.method, rule.path.pattern)
                    self.hits[key] = self.hits.get(key, 0) + 1
                    return rule
        return None

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length", 0) or 0)
        body = req.rfile.read(length) if length else b""
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(req)
        rule = self._match(req.command, req.path)
        if rule is not None and rule.status:
            data = b"" if req.command == "HEAD" else _ERROR_BODY.format(code=rule.code).encode()
            req.send_response(rule.status)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
            return
        hop = ("transfer-encoding", "connection")
        headers = {k: v for k, v in req.headers.items() if k.lower() not in hop}
        if body or "Content-Length" in req.headers:
            headers["Content-Length"] = str(len(body))
        resp = self._http.request(
            req.command,
            self.target + req.path,
            body=body or None,
            headers=headers,
            redirect=False,
            retries=False,
            preload_content=True,
            decode_content=False,
        )
        req.send_response(resp.status)
        for k, v in resp.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                req.send_header(k, v)
        data = resp.data or b""
        req.send_header("Content-Length", str(resp.headers.get("Content-Length", len(data))))
        req.end_headers()
        if rule is not None:  # a cut: half the body, then the connection is gone
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        if req.command != "HEAD":
            req.wfile.write(data)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.clear()


def _read_chunked(req: http.server.BaseHTTPRequestHandler) -> bytes:
    out = bytearray()
    while True:
        size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            req.rfile.readline()
            return bytes(out)
        out += req.rfile.read(size)
        req.rfile.readline()
