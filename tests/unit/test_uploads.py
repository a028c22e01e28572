"""Keys of uploaded files and folder scanning: no two files may share a key by accident."""

from __future__ import annotations

from pathlib import Path

from api import create_app
from batchvision.client.bulk import scan
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.intake import unique_keys as _unique_keys


def test_same_names_in_one_request_get_distinct_keys() -> None:
    ups = _unique_keys([("a.jpg", b"1"), ("a.jpg", b"2"), ("a.jpg#2", b"3"), ("a.jpg", b"4")])
    keys = [u.key for u in ups]
    assert len(set(keys)) == 4
    assert [u.filename for u in ups] == ["a.jpg", "a.jpg", "a.jpg#2", "a.jpg"]


def test_several_roots_keep_their_names(tmp_path: Path) -> None:
    _, data, _ = next(labelled_files(1, seed=1))
    for root in ("a", "b"):
        (tmp_path / root / "x").mkdir(parents=True)
        (tmp_path / root / "x" / "1.jpg").write_bytes(data)
    (tmp_path / "a" / "notes.txt").write_text("hi")
    found = scan([tmp_path / "a", tmp_path / "b"])
    assert [rel for rel, _ in found.images] == ["a/x/1.jpg", "b/x/1.jpg"]
    assert found.skipped == ["a/notes.txt"]
    assert [rel for rel, _ in scan([tmp_path / "a"]).images] == ["x/1.jpg"]


def test_raw_part_added_to_a_job_needs_a_filename(settings: Settings) -> None:
    client = create_app(settings).test_client()
    job = client.post("/v1/jobs", json={"expected": 2}).get_json()
    _, data, _ = next(labelled_files(1, seed=3))
    resp = client.post(f"/v1/jobs/{job['job_id']}/files", data=data, content_type="image/jpeg")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "filename_required"
    ok = client.post(f"/v1/jobs/{job['job_id']}/files?filename=a/b.jpg", data=data, content_type="image/jpeg")
    assert ok.status_code == 202 and ok.get_json()["accepted"] == 1
