"""``batchvision submit`` and ``results`` decisions the server never sees: a client that records
what the command asks of it stands in for the API (the HTTP exchanges themselves are tested
against the real server in tests/integration/test_bulk.py)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchvision.cli import commands
from batchvision.cli.commands import ExitCode
from batchvision.cli.main import main
from batchvision.client import ApiError
from batchvision.core.documents import Job, JobAccepted, ResultRow
from batchvision.core.synthetic import labelled_files

JOB = "1" * 32


def _job(cls: type[Job], **extra: Any) -> Any:
    doc = {
        "job_id": JOB,
        "status": "running",
        "total": 2,
        "done": 1,
        "failed": 0,
        "canceled": 0,
        "created_at": time.time(),
        "finished_at": None,
        "model": "shapes",
        "status_url": f"/v1/jobs/{JOB}",
        "results_url": f"/v1/jobs/{JOB}/results",
        **extra,
    }
    return cls.model_validate(doc)


class Recorder:
    """What the commands call, in order; ``status`` and ``files`` fail (they must not be needed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def open_job(self, expected: int | None = None, callback_url: str | None = None, **options: Any) -> Any:
        self.calls.append(("open_job", {"expected": expected, "callback_url": callback_url, **options}))
        return _job(JobAccepted, expected=expected)

    def add_part(self, job_id: str, files: list[tuple[str, bytes]]) -> Any:
        self.calls.append(("add_part", [name for name, _ in files]))
        rejected = [{"index": 0, "filename": files[0][0], "code": "too_many_pixels", "message": "too big"}]
        return _job(JobAccepted, rejected=rejected)

    def seal(self, job_id: str) -> Any:
        self.calls.append(("seal", job_id))
        return _job(Job)

    def status(self, job_id: str) -> Any:
        raise AssertionError("the seal's answer says how far the job is")

    def files(self, job_id: str) -> Any:
        raise AssertionError("a new job has no files to ask for")

    def download(self, job_id: str, out: Path, fmt: str) -> int:
        self.calls.append(("download", fmt))
        return out.write_bytes(b"index,filename,label\n0,a.jpg,circle\n")

    def iter_results(self, job_id: str) -> Iterator[ResultRow]:
        for i in range(3):
            yield ResultRow.model_validate({"index": i, "filename": f"{i}.jpg", "status": "ok", "label": "x"})


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    fake = Recorder()
    monkeypatch.setattr(commands, "client_of", lambda args: fake)
    return fake


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, data, _ in labelled_files(2, seed=3):
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_a_callback_and_the_options_open_the_job_once_and_its_id_comes_first(
    recorder: Recorder, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["submit", str(folder), "--callback-url", "https://hooks.example/x", "--top-k", "2", "--no-progress"]
    )
    assert code == ExitCode.OK
    assert [c[0] for c in recorder.calls] == ["open_job", "add_part", "seal"]
    assert recorder.calls[0][1] == {"expected": 2, "callback_url": "https://hooks.example/x", "top_k": 2}
    out, err = capsys.readouterr()
    assert out.splitlines() == [JOB]
    assert "refused: " in err and "too_many_pixels" in err  # what the API refused is reported
    assert "(1 classified, 0 with an error so far)" in err  # the seal's counts


def test_an_upload_into_a_job_canceled_meanwhile_does_not_say_resume(
    recorder: Recorder, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def sealed(job_id: str, files: list[tuple[str, bytes]]) -> Any:
        raise ApiError(409, {"error": {"code": "job_sealed", "message": "the job is canceled"}})

    monkeypatch.setattr(recorder, "add_part", sealed)
    assert main(["submit", str(folder), "--no-progress"]) == ExitCode.SUBMIT_FAILED
    err = capsys.readouterr().err
    assert f"job {JOB} takes no more files (job_sealed)" in err and "--resume" not in err


def test_resume_cannot_change_how_the_job_was_opened(
    recorder: Recorder, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["submit", str(folder), "--resume", JOB, "--model", "colours", "--callback-url", "https://h/x"]
    )
    assert code == ExitCode.USAGE
    assert "--model, --callback-url cannot change it" in capsys.readouterr().err
    assert recorder.calls == []


def test_a_folder_without_images_opens_no_job(
    recorder: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["submit", str(tmp_path)]) == ExitCode.USAGE
    assert "no image files in" in capsys.readouterr().err
    assert recorder.calls == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--part-mb", "nan"],
        ["--part-mb", "0"],
        ["--part-files", "0"],
        ["--retry-for", "inf"],
        ["--retry-for", "-1"],
    ],
)
def test_numbers_out_of_range_are_usage_errors_naming_what_is_allowed(
    folder: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["submit", str(folder), *argv])
    assert info.value.code == 2
    assert "give a" in capsys.readouterr().err


@pytest.fixture
def finished(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The recorder, its job finished (``results`` asks for its status first)."""
    monkeypatch.setattr(
        recorder, "status", lambda job_id: _job(Job, status="succeeded", done=2), raising=False
    )
    return recorder


def test_results_in_csv_on_stdout_are_csv(
    finished: Recorder, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["results", JOB, "--format", "csv"]) == ExitCode.OK
    captured = capsysbinary.readouterr()
    assert captured.out == b"index,filename,label\n0,a.jpg,circle\n"
    assert finished.calls == [("download", "csv")]
    assert b"note:" not in captured.err


def test_results_of_a_job_still_running_say_they_are_the_results_so_far(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(recorder, "status", lambda job_id: _job(Job), raising=False)
    assert main(["results", JOB]) == ExitCode.OK
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3  # the rows so far, as they are
    assert f"note: job {JOB} is running (1 of 2 images have a result): these are the results so far" in (
        captured.err
    )


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_stops_early_is_not_an_error(
    finished: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdout", _ClosedPipe())  # `batchvision results JOB | head -1`
    assert main(["results", JOB]) == ExitCode.OK


def test_an_answer_of_another_shape_is_a_message_not_a_traceback(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def newer(job_id: str) -> Job:
        return Job.model_validate({"job_id": job_id, "status": "paused"})  # a status this client lacks

    monkeypatch.setattr(recorder, "status", newer, raising=False)
    assert main(["status", JOB]) == ExitCode.REQUEST_FAILED
    err = capsys.readouterr().err
    assert "does not fit this client" in err and "status" in err


def test_a_reader_gone_during_an_upload_is_a_failed_submit(
    recorder: Recorder, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `batchvision submit DIR | tee log` and tee died: the job id could not be written, the
    # upload stopped before its first part. That is no success.
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    assert main(["submit", str(folder), "--no-progress"]) == ExitCode.SUBMIT_FAILED
    assert [c[0] for c in recorder.calls] == ["open_job"]


def test_an_interrupted_upload_says_how_to_resume_it(
    recorder: Recorder, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(job_id: str, files: list[tuple[str, bytes]]) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder, "add_part", interrupted)
    assert main(["submit", str(folder), "--top-k", "2", "--no-progress"]) == 128 + 2
    assert (
        f"finish it with --resume {JOB} and without --top-k (the job keeps them)" in capsys.readouterr().err
    )
