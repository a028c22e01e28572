"""The client commands' exit codes, as the documentation's table gives them: a real (tiny) HTTP
server answers each request with an API error document, and the command's exit status names
what failed."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from batchvision.cli.commands import ExitCode
from batchvision.cli.main import main

JOB = "0" * 32
#: Why each file of a refused submission was refused, as the API lists it.
REASONS = [
    {"filename": f"f{i}.jpg", "code": "truncated", "message": "the file ends early"} for i in range(12)
]


class _Refuses(BaseHTTPRequestHandler):
    """Every request gets ``404 not_found`` (GET) or ``422 no_valid_images`` (anything else)."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, code = (404, "not_found") if self.command == "GET" else (422, "no_valid_images")
        details = [] if self.command == "GET" else REASONS
        body = json.dumps(
            {"error": {"code": code, "message": "refused by the test", "details": details}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from batchvision.core.synthetic import labelled_files

    name, data, _ = next(labelled_files(1, seed=1))
    (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "argv",
    [["status", JOB], ["results", JOB], ["cancel", JOB], ["models"], ["reload", "shapes"]],
    ids=lambda a: a[0],
)
def test_a_refused_request_is_request_failed(api_url: str, argv: list[str]) -> None:
    assert main([*argv, "--api-url", api_url]) == ExitCode.REQUEST_FAILED == 5


def test_a_refused_submission_is_submit_failed_and_says_why_for_each_file(
    api_url: str, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["submit", str(image), "--no-progress", "--api-url", api_url, "--retry-for", "0"])
    assert code == ExitCode.SUBMIT_FAILED == 4
    err = capsys.readouterr().err
    assert "422 no_valid_images: refused by the test" in err
    assert "  f0.jpg: the file ends early (truncated)" in err and "  f9.jpg: " in err
    assert "f10.jpg" not in err and "... and 2 more" in err


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "read-only"])
def test_an_output_file_that_cannot_be_written_is_refused_before_anything_is_sent(
    where: str,
    api_url: str,
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if where == "missing-folder":
        out, why = tmp_path / "nope" / "r.csv", f"the folder {tmp_path / 'nope'} does not exist"
    elif where == "a-folder":
        out, why = tmp_path, "is a folder"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if os.access(locked, os.W_OK):  # root writes anywhere: the folder is made unwritable here
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real(p, mode))
        out, why = locked / "r.csv", "is not writable"
    # Sent, the submit would be refused by the server (exit 4), the results not found (exit 5).
    assert main(["submit", str(image), "--wait", "-o", str(out), "--api-url", api_url]) == ExitCode.USAGE
    assert f"-o {out}: " in (err := capsys.readouterr().err) and why in err, err
    assert main(["results", JOB, "-o", str(out), "--api-url", api_url]) == ExitCode.USAGE


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://example.com", "http://"])
def test_an_api_url_that_is_not_http_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["status", JOB, "--api-url", url]) == ExitCode.USAGE
    assert f"API URL {url!r}: give it as http://host:port" in capsys.readouterr().err
    monkeypatch.setenv("BATCHVISION_API_URL", url)  # the environment's is checked alike
    assert main(["submit", "--no-progress", "."]) == ExitCode.USAGE


def test_output_without_wait_is_a_usage_error(
    api_url: str, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["submit", str(image), "-o", str(image / "out.csv"), "--api-url", api_url])
    assert code == ExitCode.USAGE == 2
    assert "--wait" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["out.parquet", "out.txt", "out"])
def test_an_output_file_whose_extension_names_no_format_is_refused_before_anything_is_sent(
    name: str, api_url: str, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(image / name)
    # Sent, the submit would be refused by the server (exit 4), the results not found (exit 5).
    assert main(["submit", str(image), "--wait", "-o", out, "--api-url", api_url]) == ExitCode.USAGE
    assert "results format comes from the file's extension" in capsys.readouterr().err
    assert main(["results", JOB, "-o", out, "--api-url", api_url]) == ExitCode.USAGE
    assert ".csv, .jsonl, .ndjson, .json" in capsys.readouterr().err
    # --format says which: the name may be anything (this one reaches the server, which has no job).
    assert main(["results", JOB, "-o", out, "--format", "jsonl", "--api-url", api_url]) != ExitCode.USAGE


def test_a_missing_folder_is_a_usage_error(api_url: str, tmp_path: Path) -> None:
    assert main(["submit", str(tmp_path / "nope"), "--api-url", api_url]) == ExitCode.USAGE


def test_the_codes_are_distinct() -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)


def test_a_bad_log_format_is_a_configuration_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCHVISION_LOG_FORMAT", "xml")
    assert main(["status", JOB]) == ExitCode.USAGE
    assert "BATCHVISION_LOG_FORMAT='xml'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["api", "worker", "up"])
def test_a_stray_celery_broker_url_is_refused_by_every_service(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Celery would read it before our settings and quietly use another broker.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://elsewhere:6379/9")
    assert main([command]) == ExitCode.USAGE
    assert "CELERY_BROKER_URL" in capsys.readouterr().err


def test_flower_without_the_flower_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util
    import os

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flower" else real(name, *a)
    )

    def execv(*args: object) -> None:
        raise AssertionError(f"started {args} although Flower is missing")

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setenv("BATCHVISION_FLOWER_USER", "admin")
    monkeypatch.setenv("BATCHVISION_FLOWER_PASSWORD", "secret")
    assert main(["flower"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "Flower is not installed" in err and "EXTRAS=api,flower --target flower" in err


@pytest.mark.parametrize("version", ["two", "0", "-1", "1.5"])
def test_reload_refuses_a_version_that_is_not_a_number_or_latest(
    version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["reload", "shapes", "--version", version, "--api-url", "http://127.0.0.1:9"])
    assert usage.value.code == 2
    assert "nor 'latest'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["models"], ["reload", "shapes"]], ids=lambda a: a[0])
def test_model_commands_take_the_retry_budget_of_every_client_command(argv: list[str], api_url: str) -> None:
    # Answered 404/422 by the test's API: refused at once, as --retry-for 0 asks.
    assert main([*argv, "--api-url", api_url, "--retry-for", "0"]) == ExitCode.REQUEST_FAILED


def test_a_missing_api_key_says_how_the_cli_sends_one(capsys: pytest.CaptureFixture[str]) -> None:
    from batchvision.cli import commands
    from batchvision.client import ApiError

    def refused() -> int:
        raise ApiError(401, {"error": {"code": "unauthorized", "message": "send an X-API-Key header"}})

    assert commands._request_failed_on_error(refused) == ExitCode.REQUEST_FAILED
    err = capsys.readouterr().err
    assert "401 unauthorized" in err and "--api-key or BATCHVISION_API_KEY" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "--limit", "500"],
        ["jobs", "--limit", "0"],
        ["submit", ".", "--priority", "10"],
        ["submit", ".", "--top-k", "0"],
        ["submit", ".", "--min-score", "1.5"],
    ],
    ids=lambda a: " ".join(a[-2:]),
)
def test_options_out_of_their_fixed_range_are_usage_errors_before_any_request(
    argv: list[str], api_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Sent, they would be refused by the server (exit 4 or 5); the range is known here.
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--api-url", api_url])
    assert usage.value.code == ExitCode.USAGE
    assert "give a" in capsys.readouterr().err
