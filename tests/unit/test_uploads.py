"""Keys of uploaded files and folder scanning: no two files may share a key by accident."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchvision.client.bulk import scan
from batchvision.core.synthetic import labelled_files
from batchvision.server.intake import unique_keys as _unique_keys


def test_same_names_in_one_request_get_distinct_keys() -> None:
    ups = _unique_keys([("a.jpg", b"1"), ("a.jpg", b"2"), ("a.jpg#2", b"3"), ("a.jpg", b"4")])
    keys = [u.key for u in ups]
    assert len(set(keys)) == 4
    assert keys[0] == "a.jpg"  # the first keeps its name: a re-sent part maps to the same key
    assert [u.filename for u in ups] == ["a.jpg", "a.jpg", "a.jpg#2", "a.jpg"]
    assert [u.data for u in ups] == [b"1", b"2", b"3", b"4"]


def test_distinct_names_are_their_own_keys() -> None:
    # The key is the relative path: the same file sent in a later request gets the same key,
    # which is what makes re-sent bulk parts idempotent.
    ups = _unique_keys([("x/a.jpg", b"1"), ("y/a.jpg", b"2")])
    assert [u.key for u in ups] == ["x/a.jpg", "y/a.jpg"]


def test_several_roots_keep_their_names(tmp_path: Path) -> None:
    _, data, _ = next(labelled_files(1, seed=1))
    for root in ("a", "b"):
        (tmp_path / root / "x").mkdir(parents=True)
        (tmp_path / root / "x" / "1.jpg").write_bytes(data)
    (tmp_path / "a" / "notes.txt").write_text("hi")
    (tmp_path / "a" / "noext").write_bytes(data)  # an image found by its content
    # Named as images the API reads, holding none: sent, so that each gets its row and reason.
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "fake.PNG").write_bytes(b"text")
    (tmp_path / "b" / "scan.tiff").write_bytes(b"II*\0" + b"\0" * 60)  # a format it does not read
    found = scan([tmp_path / "a", tmp_path / "b"])
    assert [rel for rel, _ in found.images] == [
        "a/noext",
        "a/x/1.jpg",
        "b/empty.jpg",
        "b/fake.PNG",
        "b/x/1.jpg",
    ]
    assert found.skipped == ["a/notes.txt", "b/scan.tiff"]
    assert [rel for rel, _ in scan([tmp_path / "a"]).images] == ["noext", "x/1.jpg"]


def test_roots_or_files_that_would_share_a_name_are_refused_by_name(tmp_path: Path) -> None:
    # /data/2023/photos and /data/2024/photos both give photos/x.jpg; two files named alone
    # give x.jpg twice: the second would be taken for a re-send of the first.
    _, data, _ = next(labelled_files(1, seed=1))
    for year in ("2023", "2024"):
        (tmp_path / year / "photos").mkdir(parents=True)
        (tmp_path / year / "photos" / "x.jpg").write_bytes(data)
    photos = [tmp_path / "2023" / "photos", tmp_path / "2024" / "photos"]
    with pytest.raises(ValueError, match=r"1 image names .*'photos/x\.jpg' is both .*2023.* and .*2024"):
        scan(photos)
    with pytest.raises(ValueError, match="'x.jpg' is both"):
        scan([p / "x.jpg" for p in photos])
    assert len(scan([photos[0], tmp_path / "2024"]).images) == 2  # photos/x.jpg and 2024/photos/x.jpg


@pytest.mark.parametrize("name", ["x\\y.jpg", "new\nline.jpg", "pct%22.jpg"])
def test_names_a_multipart_upload_would_change_are_refused(tmp_path: Path, name: str) -> None:
    # werkzeug drops a backslash, escapes a newline and decodes %22: the job would hold another
    # name, and a resumed upload would send the file again.
    _, data, _ = next(labelled_files(1, seed=1))
    (tmp_path / name).write_bytes(data)
    (tmp_path / "100% fine.jpg").write_bytes(data)
    with pytest.raises(ValueError, match="1 image names would not arrive"):
        scan([tmp_path])
    (tmp_path / name).unlink()
    assert [rel for rel, _ in scan([tmp_path]).images] == ["100% fine.jpg"]


def test_cli_submit_refuses_roots_that_would_share_a_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchvision.cli.commands import ExitCode
    from batchvision.cli.main import main

    _, data, _ = next(labelled_files(1, seed=1))
    for year in ("2023", "2024"):
        (tmp_path / year / "photos").mkdir(parents=True)
        (tmp_path / year / "photos" / "x.jpg").write_bytes(data)
    argv = ["submit", str(tmp_path / "2023" / "photos"), str(tmp_path / "2024" / "photos")]
    assert main([*argv, "--api-url", "http://127.0.0.1:9", "--retry-for", "0"]) == ExitCode.USAGE
    assert "photos/x.jpg" in capsys.readouterr().err


def test_the_same_file_named_twice_is_sent_once_and_a_name_not_utf8_is_refused(tmp_path: Path) -> None:
    _, data, _ = next(labelled_files(1, seed=1))
    (tmp_path / "a.jpg").write_bytes(data)
    assert [rel for rel, _ in scan([tmp_path / "a.jpg", tmp_path / "a.jpg"]).images] == ["a.jpg"]
    with open(os.fsencode(tmp_path) + b"/\xff.jpg", "wb") as fh:  # a Latin-1 name on a UTF-8 system
        fh.write(data)
    with pytest.raises(ValueError, match="is not UTF-8"):
        scan([tmp_path])


def test_a_request_that_goes_on_waiting_lets_go_of_its_body() -> None:
    from io import BytesIO

    from werkzeug.test import EnvironBuilder

    from api.uploads import UploadRequest

    payload = b"x" * 100_000
    environ = EnvironBuilder(method="POST", data={"files": (BytesIO(payload), "a.jpg")}).get_environ()
    request = UploadRequest(environ)
    part = request.files["files"]
    assert part.read() == payload
    raw = UploadRequest(EnvironBuilder(method="POST", data=payload, content_type="image/jpeg").get_environ())
    assert raw.get_data() == payload
    for req in (request, raw):
        req.release_body()
        assert not {"files", "form", "_cached_data"} & set(req.__dict__)
    assert part.stream.closed  # the in-memory copy of the part is freed
