"""Settings from the environment (the configuration reference generated from them is checked
by tests/unit/test_docs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchvision.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_env_overrides() -> None:
    s = Settings.from_env(
        {"BATCHVISION_MAX_BATCH_SIZE": "8", "BATCHVISION_MAX_BATCH_DELAY_MS": "2.5", "OTHER": "x"}
    )
    assert s.max_batch_size == 8 and s.max_batch_delay_ms == 2.5
    assert Settings.from_env({}).max_batch_size == 32
    assert Settings.from_env({}, top_k=3).top_k == 3


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="BATCHVISION_TOP_K"):
        Settings.from_env({"BATCHVISION_TOP_K": "many"})


def test_round_trip_through_env() -> None:
    s = Settings.from_env({}, max_batch_size=7, model="/m/x.keras")
    assert Settings.from_env(s.to_env(include_secrets=True)) == s


def test_visibility_timeout_exceeds_task_time_limit_by_default() -> None:
    s = Settings()
    assert s.visibility_timeout_s > s.task_time_limit_s
