"""The chunk processor with several models, in-process against a private
redis-server: each job's images go to the lane of its model with its own options; a chunk of a
model this worker does not serve is handed on untouched (no result, no delivery counted, still
in the ledger); a pinned version that cannot be loaded is a per-image error."""

from __future__ import annotations

from typing import Any

from batchvision.core.model_refs import JobOptions
from batchvision.server import keys
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk
from batchvision.server.recovery import chunk_member


def _job(rig: Any, job_id: str, colours: list[str], options: JobOptions) -> list[int]:
    ix: list[int] = rig.job(job_id, [rig.jpeg(c) for c in colours], options=options)
    return ix


def test_each_job_runs_on_its_models_lane_with_its_own_options(rig: Any) -> None:
    a = _job(rig, "a", ["red", "green", "blue"], JobOptions("colours", top_k=1))
    b = _job(rig, "b", ["blue", "red"], JobOptions("rgb", top_k=3, min_score=0.2))
    # One message with both jobs (as coalesced interactive chunks may be).
    summary = rig.process(("a", a), ("b", b), urgent=True)
    assert summary["classified"] == 5
    rows_a, rows_b = rig.rows("a"), rig.rows("b")
    assert [r["label"] for r in rows_a] == ["red", "green", "blue"]
    assert all(len(r["top_k"]) == 1 and r["model"] == "colours" and r["version"] == 7 for r in rows_a)
    assert [r["label"] for r in rows_b] == ["B", "R"]
    assert all(r["model"] == "rgb" and all(s["score"] >= 0.2 for s in r["top_k"]) for r in rows_b)
    assert all(len(r["top_k"]) < 3 for r in rows_b), "min_score dropped the weak classes"
    assert sorted((c.done, m) for c, m in rig.recorded) == [(2, "rgb"), (3, "colours")]


def test_a_chunk_of_a_model_not_served_here_is_handed_on_untouched(rig: Any) -> None:
    ix = _job(rig, "x", ["red", "green"], JobOptions("shapes"))
    summary = rig.process(("x", ix), urgent=False, enqueued_at=99.5)
    assert summary["classified"] == 0 and rig.handed == [(Chunk.of("x", ix), "shapes", False)]
    assert rig.handed_at == [99.5]  # its queue wait goes on from its upload
    assert rig.rows("x")[0]["status"] == "pending", "nothing stored"
    assert rig.r.zscore(keys.CHUNKS, chunk_member(Chunk.of("x", ix))) is not None, "still in the ledger"
    assert int(rig.r.hget(JobKeys.of("x").tries, f"chunk:{ix[0]}") or 0) == 0, "not a delivery"
    assert rig.r.exists(keys.blob("x", ix[0])), "its uploads wait for the right worker"


def test_a_pinned_version_that_cannot_load_is_a_per_image_error(rig: Any) -> None:
    ix = _job(rig, "p", ["red", "blue"], JobOptions("colours", version=99))
    rig.process(("p", ix))
    rows = rig.rows("p")
    assert {r["error"]["code"] for r in rows} == {"model_version_unavailable"}
    job = rig.store.get("p")
    assert job is not None and job["status"] == "failed" and job["model_version"] == 99
