"""Start-up checks of a worker's configuration: refuse what would lose or double work."""

from __future__ import annotations

import logging

import redis

from batchvision.core.settings import Settings

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """A configuration that cannot work; the message says what to change."""


def check_worker_settings(settings: Settings) -> None:
    """Refuse a visibility timeout that a task could outlive (it would run twice)."""
    if settings.visibility_timeout_s <= settings.task_time_limit_s:
        raise ConfigError(
            f"BATCHVISION_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must be longer than "
            f"BATCHVISION_TASK_TIME_LIMIT_S={settings.task_time_limit_s}: Redis would hand a running "
            "task to a second worker"
        )


def eviction_warning(client: redis.Redis) -> str | None:
    """A warning if Redis may evict keys under memory pressure (queue, jobs, uploads)."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.exceptions.ResponseError:  # CONFIG disabled (managed Redis): cannot tell
        return None
    if policy and policy != "noeviction":
        return (
            f"Redis maxmemory-policy is {policy!r}: under memory pressure it may evict queued tasks, "
            "job records or uploads; set it to 'noeviction'"
        )
    return None
