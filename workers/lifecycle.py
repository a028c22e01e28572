"""An ordered list of components, each with ``start`` and ``stop``: started in order, stopped
in reverse, also when a later start fails (the components already started are stopped, in
reverse, and the start's error is raised).

The same contract as Celery's bootsteps, typed and usable without a Celery worker (the unit
tests run it on its own): a component gets the components it needs in its constructor, and
reads what they made only after they started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class Component(Protocol):
    """One part of the worker."""

    #: Short, for the log and the document of the composition.
    name: str

    def start(self) -> None:
        """Start; raise if this component cannot run (the worker does not start)."""
        ...

    def stop(self) -> None:
        """Stop what :meth:`start` started; called only after a successful start, once."""
        ...


class StartError(RuntimeError):
    """A component cannot start for a reason its message says in full (a setting to change):
    logged without a traceback."""


class NotStarted(RuntimeError):
    """What a component made was asked for before the component started."""


class Lifecycle:
    """Starts components in order and stops them in reverse (see the module doc)."""

    def __init__(self, components: Sequence[Component]) -> None:
        self.components = list(components)
        self._started: list[Component] = []
        self._lock = threading.Lock()

    @property
    def started(self) -> list[str]:
        """The names of the components running now, in start order."""
        return [c.name for c in self._started]

    def start(self) -> None:
        """Start every component in order. If one fails, stop those already started (in
        reverse) and raise its error."""
        with self._lock:
            for component in self.components:
                begin = time.perf_counter()
                try:
                    component.start()
                except BaseException:
                    log.error("worker component %s failed to start; stopping the others", component.name)
                    self._stop_started()
                    raise
                self._started.append(component)
                log.debug("started %s in %.3fs", component.name, time.perf_counter() - begin)

    def stop(self) -> None:
        """Stop the started components in reverse order; an error of one is logged and the
        others are still stopped. Safe to call twice."""
        with self._lock:
            self._stop_started()

    def _stop_started(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception:  # noqa: BLE001 - the next component must still stop
                log.exception("worker component %s failed to stop", component.name)
