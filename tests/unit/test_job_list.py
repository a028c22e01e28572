"""``GET /v1/jobs``'s query and cursor, without a server."""

from __future__ import annotations

import typing

import pytest

from batchvision.core.errors import BadRequest
from batchvision.core.job_list import JobListQuery
from batchvision.core.results import JobStatus
from batchvision.server.job_list import cursor_of, parse_cursor


def test_the_status_filter_takes_every_job_status() -> None:
    (literal, _none) = typing.get_args(JobListQuery.model_fields["status"].annotation)
    assert set(typing.get_args(literal)) == {s.value for s in JobStatus}


def test_a_cursor_round_trips_and_a_foreign_one_is_refused() -> None:
    job_id = "0123456789abcdef" * 2
    assert parse_cursor(cursor_of(1796400000.1234, job_id)) == (1796400000.123, job_id)
    for bad in ("", "x", f"1.5-{job_id}", f"1.500-{job_id[:-1]}", f"1.500-{job_id}-"):
        with pytest.raises(BadRequest) as err:
            parse_cursor(bad)
        assert err.value.code == "bad_parameter" and "'cursor'" in err.value.message
