"""A client command stopped by SIGTERM cleans up as after Ctrl-C: a real ``batchvision
results -o`` process, its download hanging half-way on a tiny HTTP server, is terminated."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

JOB = "2" * 32


class _HalfThenHang(BaseHTTPRequestHandler):
    """The job's status (finished), and its results as CSV: the header line, then nothing more
    (until the test ends)."""

    protocol_version = "HTTP/1.1"  # chunked answers
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self.path.split("?")[0].endswith("/results"):  # the job's status: finished
            body = json.dumps(
                {
                    **{"job_id": JOB, "status": "succeeded", "total": 1, "done": 1, "failed": 0},
                    **{"canceled": 0, "created_at": 1.0, "finished_at": 2.0, "model": "shapes"},
                    **{"status_url": f"/v1/jobs/{JOB}", "results_url": f"/v1/jobs/{JOB}/results"},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        line = b"index,filename,label\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()
        self.release.wait(60)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HalfThenHang)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _HalfThenHang.release.set()
    server.shutdown()
    server.server_close()


def test_sigterm_during_a_download_leaves_no_partial_file(
    api_url: str, tmp_path: Path, wait_until: Any
) -> None:
    out = tmp_path / "results.csv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchvision.cli", "results", JOB, "-o", str(out), "--api-url", api_url],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        part = tmp_path / ".results.csv.part"
        wait_until(part.exists, timeout=30, message="the download began")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
