"""Per-model queues: a job's chunks go to its model's queues, so a worker consumes only the
models it holds and a message never carries two models.

The default model keeps the queue names of a one-model deployment (``<QUEUE>`` and
``<QUEUE>.interactive``); any other model ``m`` has ``<QUEUE>.m`` and ``<QUEUE>.m.interactive``.
Bulk chunks of a job whose priority is in the high or low tier
(:mod:`batchvision.core.priorities`) go to ``<bulk>.high`` or ``<bulk>.low``; the normal tier
keeps ``<bulk>``. Model names hold no dots and ``interactive``, ``high`` and ``low`` are
reserved, so no two models share a queue.
"""

from __future__ import annotations

from collections.abc import Iterable

from batchvision.core.model_refs import model_name_of
from batchvision.core.priorities import DEFAULT_PRIORITY, TIERS_DOWN, Tier, tier_of
from batchvision.core.settings import Settings

INTERACTIVE_SUFFIX = ".interactive"


def default_model(settings: Settings) -> str:
    """The model of a job that names none: ``BATCHVISION_MODEL``'s name."""
    return model_name_of(settings.model)


def bulk_queue(settings: Settings, model: str | None = None, tier: Tier = Tier.NORMAL) -> str:
    """The queue of ``model``'s bulk chunks of ``tier`` (``None``: the default model)."""
    if model is None or model == default_model(settings):
        return settings.queue + tier.suffix
    return f"{settings.queue}.{model}{tier.suffix}"


def interactive_queue(settings: Settings, model: str | None = None) -> str:
    """The queue of ``model``'s small jobs, served ahead of its bulk chunks of every tier."""
    return bulk_queue(settings, model) + INTERACTIVE_SUFFIX


def queue_for(
    settings: Settings, model: str | None, interactive: bool, priority: int = DEFAULT_PRIORITY
) -> str:
    """Where a message goes: ``model``'s interactive queue, or its bulk queue of the tier of
    ``priority``."""
    if interactive:
        return interactive_queue(settings, model)
    return bulk_queue(settings, model, tier_of(priority))


def tier_of_queue(name: str) -> Tier | None:
    """The tier of a bulk queue from its name, ``None`` for an interactive queue (served ahead
    of every tier). A name without a tier's suffix is the normal tier."""
    if name.endswith(INTERACTIVE_SUFFIX):
        return None
    for tier in TIERS_DOWN:
        if tier.suffix and name.endswith(tier.suffix):
            return tier
    return Tier.NORMAL


def worker_queues(settings: Settings, models: Iterable[str]) -> list[str]:
    """What a worker serving ``models`` consumes, in the order it reads them: every interactive
    queue first, then the bulk ones, highest tier first (the turns between tiers are the
    worker's, see :mod:`batchvision.core.priorities`)."""
    names = list(dict.fromkeys(models))
    bulk = [bulk_queue(settings, m, tier) for tier in TIERS_DOWN for m in names]
    return [interactive_queue(settings, m) for m in names] + bulk


def model_queues(settings: Settings, models: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``{model: (bulk, interactive, bulk high, bulk low)}`` for gauges and the chunk sweeper."""
    return {
        m: (
            bulk_queue(settings, m),
            interactive_queue(settings, m),
            bulk_queue(settings, m, Tier.HIGH),
            bulk_queue(settings, m, Tier.LOW),
        )
        for m in models
    }
