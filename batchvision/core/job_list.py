"""The documents of ``GET /v1/jobs``: an API key's jobs, newest first, a page at a time."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from batchvision.core.documents import Document, Job

#: Most jobs one page holds.
MAX_PAGE = 200
#: A cursor: the creation time and id of the last job of the previous page (opaque to clients).
CURSOR_PATTERN = r"^[0-9]{1,12}\.[0-9]{3}-[0-9a-f]{32}$"


class JobListQuery(BaseModel):
    """Query of ``GET /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    # A literal, not the JobStatus enum: a query parameter's schema is inlined (no $defs).
    status: Literal["queued", "running", "succeeded", "partial", "failed", "canceled"] | None = Field(
        None, description="only jobs in this status"
    )
    created_after: float | None = Field(
        None, ge=0, description="only jobs created at or after this Unix time"
    )
    created_before: float | None = Field(None, ge=0, description="only jobs created before this Unix time")
    limit: int = Field(20, ge=1, le=MAX_PAGE, description="jobs in a page")
    cursor: str | None = Field(
        None,
        pattern=CURSOR_PATTERN,
        max_length=50,
        description="next_cursor of the previous page: the page after it",
    )


class JobList(Document):
    """A page of the caller's jobs, newest first; ``next_cursor`` is null on the last page."""

    jobs: list[Job]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: no more jobs")
