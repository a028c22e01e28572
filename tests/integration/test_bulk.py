"""Bulk folders and the CLI against the real stack: parts, resume, idempotent re-sends,
zip archives, hostile archives."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from api import create_app
from batchvision.client import ApiError, Client
from batchvision.client.bulk import submit_folder
from batchvision.core.documents import JobAccepted
from batchvision.core.settings import Settings
from batchvision.core.synthetic import encode, labelled_files
from batchvision.server.connect import connect_redis
from batchvision.server.store import JobStore


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """300 images in nested folders, plus non-image files; returns (root, {relpath: label})."""
    root = tmp_path_factory.mktemp("photos")
    labels: dict[str, str] = {}
    for i, (name, data, label) in enumerate(labelled_files(300, seed=300)):
        folder = root / f"set{i % 3}" / f"sub{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        labels[f"set{i % 3}/sub{i % 5}/{name}"] = label
    (root / "README.txt").write_text("not an image")
    (root / "set0" / "notes.md").write_text("# notes")
    (root / "set1" / "fake.jpg").write_bytes(b"text pretending to be a jpeg")
    # An image without an extension is still an image: found by content.
    name, data, label = next(labelled_files(1, seed=999))
    (root / "set2" / "noext").write_bytes(data)
    labels["set2/noext"] = label
    return root, labels


def cli(*args: str, api_url: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHVISION_API_URL": api_url}
    return subprocess.run(
        [sys.executable, "-m", "batchvision.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_submits_a_folder_in_parts_and_writes_one_row_per_image(
    tree: tuple[Path, dict[str, str]],
    api_url: str,
    settings: Settings,
    tmp_path: Path,
    reference_labels: Callable[..., list[str]],
) -> None:
    root, labels = tree
    out = tmp_path / "results.csv"
    proc = cli("submit", str(root), "--wait", "-o", str(out), "--part-files", "16", api_url=api_url)
    # The file named as a JPEG that is none is sent and gets its error row: not every image
    # has a prediction (exit 3).
    assert proc.returncode == 3, proc.stderr
    assert "skipped (not an image): README.txt" in proc.stderr
    assert "skipped (not an image): set1/fake.jpg" not in proc.stderr
    assert "refused: set1/fake.jpg: not_an_image" in proc.stderr
    assert "upload" in proc.stderr and "classify" in proc.stderr  # both progress bars
    print(proc.stderr.splitlines()[-1])
    rows = read_csv(out)
    assert [r["filename"] for r in rows] == sorted([*labels, "set1/fake.jpg"])  # relative paths, upload order
    fake = rows.pop([r["filename"] for r in rows].index("set1/fake.jpg"))
    assert fake["label"] == "" and fake["error"].startswith("not_an_image"), fake
    assert len({r["filename"] for r in rows}) == len(labels) == 301
    # Each label is the demo model's own for that image (never how well it happened to train).
    files = [(r["filename"], (root / r["filename"]).read_bytes()) for r in rows]
    assert [r["label"] for r in rows] == reference_labels(Path(settings.model), files)
    assert all(r["error"] == "" and r["top_k"].count(":") >= 1 for r in rows)
    job_id = proc.stdout.strip().splitlines()[-1]
    jsonl = tmp_path / "results.jsonl"
    assert cli("results", job_id, "-o", str(jsonl), api_url=api_url).returncode == 0
    assert len(jsonl.read_text().splitlines()) == 302


def test_interrupted_upload_resumes_without_duplicates_or_gaps(
    tree: tuple[Path, dict[str, str]], api_url: str, tmp_path: Path
) -> None:
    root, labels = tree
    client = Client(api_url)
    sent = []

    class Interrupted(Exception):
        pass

    def stop_after_three_parts(n: int) -> None:
        sent.append(n)
        if len(sent) == 3:
            raise Interrupted

    job_id = client.open_job(len(labels) + 1).job_id  # the images, and set1/fake.jpg
    with pytest.raises(Interrupted):  # the connection dies after three parts
        submit_folder(client, [root], part_files=20, resume=job_id, on_part=stop_after_three_parts)
    assert len(client.files(job_id).files) == 60
    assert client.status(job_id).status != "succeeded"  # not sealed: never final
    out = tmp_path / "resumed.csv"
    proc = cli(
        "submit",
        str(root),
        "--resume",
        job_id,
        "--wait",
        "-o",
        str(out),
        "--part-files",
        "20",
        api_url=api_url,
    )
    assert proc.returncode == 3, proc.stderr  # set1/fake.jpg has its error row
    assert "uploaded 242 images" in proc.stderr  # only what was missing
    rows = read_csv(out)
    assert [r["filename"] for r in rows] == sorted([*labels, "set1/fake.jpg"])
    status = client.status(job_id)
    assert (status.total, status.done, status.failed) == (302, 301, 1)


def test_resending_a_part_changes_nothing(api_url: str) -> None:
    client = Client(api_url)
    job_id = client.open_job(4).job_id
    files = [(f"dir/{n}", d) for n, d, _ in labelled_files(4, seed=41)]
    first = client.add_part(job_id, files)
    again = client.add_part(job_id, files)
    assert (first.accepted, first.duplicates) == (4, 0)
    assert (again.accepted, again.duplicates) == (0, 4)
    client.seal(job_id)
    status = client.wait(job_id, timeout=60)
    assert (status.total, status.done) == (4, 4)
    assert [r.filename for r in client.results(job_id)] == [n for n, _ in files]


def test_a_part_that_failed_half_way_is_completed_by_its_retry(api_url: str, settings: Settings) -> None:
    """A request died after indexing its files but before storing blobs and tasks: the
    retry (same relative paths) must still get every image classified."""
    client = Client(api_url)
    job_id = client.open_job(3).job_id
    files = [(f"dir/{n}", d) for n, d, _ in labelled_files(3, seed=43)]
    store = JobStore(connect_redis(settings.redis_url), result_ttl_s=60, blob_ttl_s=60)
    store.add_files(job_id, [(n, n) for n, _ in files])  # indexed, nothing else stored
    client.add_part(job_id, files)
    client.seal(job_id)
    status = client.wait(job_id, timeout=60)
    assert (status.total, status.done) == (3, 3)


def _zip_folder(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


def test_zip_of_the_folder_gives_the_same_rows(
    tree: tuple[Path, dict[str, str]],
    api_url: str,
    settings: Settings,
    reference_labels: Callable[..., list[str]],
) -> None:
    root, labels = tree
    resp = requests.post(
        f"{api_url}/v1/jobs", data=_zip_folder(root), headers={"Content-Type": "application/zip"}, timeout=120
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    skipped = {s["filename"] for s in body["skipped"]}
    assert skipped == {"README.txt", "set0/notes.md"}
    # Named as an image but none: a row with its error, as the CLI's upload of the folder gives.
    assert [(r["filename"], r["code"]) for r in body["rejected"]] == [("set1/fake.jpg", "not_an_image")]
    client = Client(api_url)
    client.wait(body["job_id"], timeout=300)
    rows = client.results(body["job_id"])
    assert sorted(r.filename for r in rows) == sorted([*labels, "set1/fake.jpg"])
    fake = rows.pop([r.filename for r in rows].index("set1/fake.jpg"))
    assert fake.error is not None and fake.error.code == "not_an_image", fake
    files = [(r.filename, (root / r.filename).read_bytes()) for r in rows]
    assert [r.label for r in rows] == reference_labels(Path(settings.model), files)


def _hostile(kind: str) -> bytes:
    buf = io.BytesIO()
    _, jpeg, _ = next(labelled_files(1, seed=3))
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.jpg", jpeg)
        if kind == "bomb":
            zf.writestr("bomb.jpg", b"\0" * 300_000_000)
        elif kind == "dotdot":
            zf.writestr("../../tmp/batchvision-escape.jpg", jpeg)
        elif kind == "absolute":
            zf.writestr("/tmp/batchvision-absolute.jpg", jpeg)
        elif kind == "symlink":
            info = zipfile.ZipInfo("link.jpg")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("bomb", 413, "archive_too_large"),
        ("dotdot", 422, "archive_rejected"),
        ("absolute", 422, "archive_rejected"),
        ("symlink", 422, "archive_rejected"),
    ],
)
def test_hostile_archives_are_refused(api_url: str, kind: str, status: int, code: str) -> None:
    before = set(os.listdir("/tmp"))
    resp = requests.post(
        f"{api_url}/v1/jobs", data=_hostile(kind), headers={"Content-Type": "application/zip"}, timeout=60
    )
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"]
    assert (
        not Path("/tmp/batchvision-escape.jpg").exists()
        and not Path("/tmp/batchvision-absolute.jpg").exists()
    )
    assert {n for n in set(os.listdir("/tmp")) - before if "batchvision" in n and "escape" in n} == set()


def test_nested_archive_is_listed_not_expanded(api_url: str) -> None:
    inner = _hostile("none")
    buf = io.BytesIO()
    _, jpeg, _ = next(labelled_files(1, seed=4))
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.jpg", jpeg)
        zf.writestr("inner.zip", inner)
    files = [("archive", ("photos.zip", buf.getvalue(), "application/zip"))]
    resp = requests.post(f"{api_url}/v1/jobs", files=files, timeout=60)
    assert resp.status_code == 202
    body = resp.json()
    assert body["total"] == 1
    assert body["skipped"] == [{"filename": "inner.zip", "reason": "nested archive (not expanded)"}]


def test_cli_exit_code_when_some_images_failed(api_url: str, tmp_path: Path) -> None:
    name, data, _ = next(labelled_files(1, seed=8))
    (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = cli("submit", str(tmp_path), "--wait", "--no-progress", api_url=api_url)
    assert proc.returncode == 3, proc.stderr  # some images failed


def test_cli_writes_results_to_standard_output_with_dash(api_url: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    files = list(labelled_files(3, seed=9))
    for name, data, _ in files:
        (images / name).write_bytes(data)
    # submit --wait -o -: standard output is the results alone, the job id goes to stderr
    proc = cli("submit", str(images), "--wait", "-o", "-", "--no-progress", api_url=api_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["filename"] for r in rows) == sorted(n for n, _, _ in files)
    assert {r["filename"]: r["label"] for r in rows} == {n: label for n, _, label in files}
    job_id = proc.stderr.splitlines()[0]
    assert Client(api_url).status(job_id).total == 3
    # results -o -, in each format
    again = cli("results", job_id, "-o", "-", api_url=api_url, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr
    as_csv = cli("results", job_id, "-o", "-", "--format", "csv", api_url=api_url, cwd=tmp_path)
    assert as_csv.returncode == 0, as_csv.stderr
    assert [r["filename"] for r in csv.DictReader(io.StringIO(as_csv.stdout))] == [
        r["filename"] for r in rows
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no file named "-"


@pytest.mark.slow  # the client retries an unreachable API for its whole retry budget (120 s)
def test_cli_exit_code_when_the_api_is_unreachable(tmp_path: Path) -> None:
    name, data, _ = next(labelled_files(1, seed=8))
    (tmp_path / name).write_bytes(data)
    start = time.monotonic()
    proc = cli("submit", str(tmp_path), "--no-progress", "--retry-for", "2", api_url="http://127.0.0.1:9")
    assert proc.returncode == 4 and "cannot reach the API" in proc.stderr
    assert time.monotonic() - start < 30  # retried for about 2 s, then gave up


def test_raw_part_added_to_a_job_needs_a_filename(settings: Settings) -> None:
    client = create_app(settings).test_client()
    job = client.post("/v1/jobs", json={"expected": 2}).get_json()
    _, data, _ = next(labelled_files(1, seed=3))
    resp = client.post(f"/v1/jobs/{job['job_id']}/files", data=data, content_type="image/jpeg")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "filename_required"
    ok = client.post(f"/v1/jobs/{job['job_id']}/files?filename=a/b.jpg", data=data, content_type="image/jpeg")
    assert ok.status_code == 202 and ok.get_json()["accepted"] == 1
    assert client.get(f"/v1/jobs/{job['job_id']}/results").get_json()["results"][0]["filename"] == "a/b.jpg"
    # The same for a multipart part without a filename: every such part would be `file0`.
    nameless = {"files": [(io.BytesIO(data), "c.jpg"), (io.BytesIO(data), "")]}
    resp = client.post(f"/v1/jobs/{job['job_id']}/files", data=nameless, content_type="multipart/form-data")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "filename_required", (
        resp.get_json()
    )
    assert resp.get_json()["error"]["details"] == [{"in": "body", "field": "files", "index": 1}]
    assert client.get(f"/v1/jobs/{job['job_id']}").get_json()["total"] == 1  # nothing of the part was added


def test_images_by_url_sent_to_classify_are_pointed_to_jobs(settings: Settings) -> None:
    client = create_app(settings).test_client()
    for body, ctype in (
        ('{"urls": ["https://example.com/a.jpg"]}', "application/json"),
        ("url\nhttps://example.com/a.jpg\n", "text/csv"),
    ):
        resp = client.post("/v1/classify", data=body, content_type=ctype)
        assert resp.status_code == 415, resp.get_json()
        assert (
            "images by URL (a JSON body or a manifest) go to POST /v1/jobs"
            in resp.get_json()["error"]["message"]
        )
    resp = client.post("/v1/classify", data=b"x", content_type="text/plain")  # no URL job: no such hint
    assert resp.status_code == 415 and "POST /v1/jobs" not in resp.get_json()["error"]["message"]


def test_client_and_cli_delete_jobs_through_the_real_server(api_url: str) -> None:
    # gunicorn answers DELETE with a 204 and, as RFC 9110 requires, no Content-Length: the
    # client must take that for a whole answer, not for headers cut off.
    client = Client(api_url, retry_for_s=5)
    first, second = client.open_job(), client.open_job()
    client.delete(first.job_id)
    proc = cli("delete", second.job_id, api_url=api_url)
    assert proc.returncode == 0 and f"deleted {second.job_id}" in proc.stderr, proc.stderr
    for job_id in (first.job_id, second.job_id):
        with pytest.raises(ApiError) as gone:
            client.status(job_id)
        assert gone.value.status == 404


def test_a_part_of_only_broken_images_is_recorded_and_the_upload_ends(api_url: str, tmp_path: Path) -> None:
    # Parts of one file: two hold nothing but a broken image. Each must become that image's
    # error row, not refuse the part: the upload could then never end, nor be resumed.
    name, data, _ = next(labelled_files(1, seed=21))
    (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "huge.png").write_bytes(encode(Image.new("RGB", (2100, 2000), (9, 9, 9)), "PNG"))  # > 4 MP
    client = Client(api_url, retry_for_s=5)
    job_id = client.open_job(3).job_id
    first = client.add_part(job_id, [("broken.png", (tmp_path / "broken.png").read_bytes())])
    assert (first.accepted, [r.filename for r in first.rejected]) == (0, ["broken.png"])
    again = client.add_part(job_id, [("broken.png", (tmp_path / "broken.png").read_bytes())])
    assert (again.accepted, again.duplicates, again.rejected) == (0, 1, [])  # a re-send changes nothing
    done = submit_folder(client, [tmp_path], part_files=1, resume=job_id)
    assert (done.sent, [r.filename for r in done.rejected]) == (2, ["huge.png"])
    status = client.wait(job_id, timeout=120)
    assert (status.status, status.total, status.done, status.failed) == ("partial", 3, 1, 2)
    rows = {r.filename: r for r in client.results(job_id)}
    assert rows[name].status == "ok"
    assert rows["broken.png"].error is not None and rows["huge.png"].error is not None
    assert rows["huge.png"].error.code == "too_many_pixels"


def test_parts_refused_as_too_large_go_again_in_halves(
    api_alone: Callable[..., AbstractContextManager[Any]], tmp_path: Path
) -> None:
    # A proxy or an API with a smaller body limit than the client's 32 MiB parts: the first part
    # of 64 files (about 640 kB here) is refused with 413, and goes again in halves; the parts
    # after it are formed small enough at once. Every image arrives once.
    names = []
    for name, data, _ in labelled_files(80, seed=4):
        (tmp_path / name).write_bytes(data)
        names.append(name)
    with api_alone(max_request_bytes=200_000) as api:
        client = Client(api.url)
        refused: list[int] = []

        class Watched(Client):  # the real client, counting the parts refused as too large
            def add_part(self, job_id: str, files: Sequence[tuple[str, bytes]]) -> JobAccepted:
                try:
                    return super().add_part(job_id, files)
                except ApiError as err:
                    if err.status == 413:
                        refused.append(len(files))
                    raise

        sent: list[int] = []
        upload = submit_folder(Watched(api.url), [tmp_path], on_part=sent.append)
        assert sorted(client.files(upload.job_id).files) == sorted(names)
        assert (upload.sealed.total, sum(sent)) == (80, 80)
        # One refusal a halving (of the files or the bytes), never one for every piece of every
        # half: the pieces after a refusal are formed within the new limit.
        assert refused[0] == 64 and len(refused) <= 4, refused
        assert all(later < earlier for earlier, later in zip(refused, refused[1:], strict=False)), refused
        # A single file over the limit cannot be split: the error says so.
        (tmp_path / "huge.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300_000))
        with pytest.raises(ApiError) as err:
            submit_folder(client, [tmp_path / "huge.jpg"])
        assert err.value.status == 413 and "200000 bytes" in str(err.value)
