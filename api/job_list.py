"""``GET /v1/jobs``: the caller's jobs, newest first, a page at a time (filters: status and
creation time). The logic is :mod:`batchvision.server.job_list`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from api import contract as c
from api.auth import current_owner
from api.jobs import _public as job_document
from api.services import services
from batchvision.core import job_list as jl
from batchvision.server.job_list import list_jobs

bp = Blueprint("v1_job_list", __name__, url_prefix="/v1")


@bp.get("/jobs")
@c.contract(
    summary="The caller's jobs (its API key's), newest first, with cursor pagination",
    description="Each entry is the job's status document. Pass `next_cursor` as `cursor` for the "
    "next page; it is null once no job is left. A request reads at most 2,000 jobs: with a filter, "
    "a page may hold fewer than `limit` (even none) and a `next_cursor`. Filters: `status`, "
    "`created_after` (inclusive) and `created_before` (exclusive), Unix times. Jobs are listed "
    "until their results expire.",
    query=jl.JobListQuery,
    responses={200: c.Response("A page of jobs", jl.JobList)},
    tags=("jobs",),
)
def list_own_jobs() -> dict[str, Any]:
    svc = services()
    params = c.query(jl.JobListQuery)
    page = list_jobs(
        svc.redis,
        svc.store.get_many,
        current_owner(),
        limit=params.limit,
        cursor=params.cursor,
        status=params.status,
        created_after=params.created_after,
        created_before=params.created_before,
    )
    return {"jobs": [job_document(j) for j in page.jobs], "next_cursor": page.next_cursor}
