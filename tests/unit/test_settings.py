"""Settings from the environment, and the README table that documents them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchvision.core.settings import Settings, env_table

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


def test_readme_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(BATCHVISION_[A-Z0-9_]+)` \| `([^`]*)` \|", readme, re.M))
    expected = {name: default for name, default, _ in env_table()}
    assert rows == expected
