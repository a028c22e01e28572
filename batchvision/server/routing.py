"""Per-model queues: a job's chunks go to its model's queues, so a worker consumes only the
models it holds and a message never carries two models.

The default model keeps the queue names of a one-model deployment (``<QUEUE>`` and
``<QUEUE>.interactive``); any other model ``m`` has ``<QUEUE>.m`` and ``<QUEUE>.m.interactive``.
Model names hold no dots and ``interactive`` is reserved, so no two models share a queue.
"""

from __future__ import annotations

from collections.abc import Iterable

from batchvision.core.model_refs import model_name_of
from batchvision.core.settings import Settings


def default_model(settings: Settings) -> str:
    """The model of a job that names none: ``BATCHVISION_MODEL``'s name."""
    return model_name_of(settings.model)


def bulk_queue(settings: Settings, model: str | None = None) -> str:
    """The queue of ``model``'s bulk chunks (``None``: the default model)."""
    if model is None or model == default_model(settings):
        return settings.queue
    return f"{settings.queue}.{model}"


def interactive_queue(settings: Settings, model: str | None = None) -> str:
    """The queue of ``model``'s small jobs, served ahead of its bulk chunks."""
    return f"{bulk_queue(settings, model)}.interactive"


def queue_for(settings: Settings, model: str | None, interactive: bool) -> str:
    return interactive_queue(settings, model) if interactive else bulk_queue(settings, model)


def worker_queues(settings: Settings, models: Iterable[str]) -> list[str]:
    """What a worker serving ``models`` consumes, in the order it reads them: every interactive
    queue first, then the bulk ones."""
    names = list(dict.fromkeys(models))
    return [interactive_queue(settings, m) for m in names] + [bulk_queue(settings, m) for m in names]


def model_queues(settings: Settings, models: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{model: (bulk, interactive)}`` for gauges and the chunk sweeper."""
    return {m: (bulk_queue(settings, m), interactive_queue(settings, m)) for m in models}
