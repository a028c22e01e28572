"""The client's one retry policy: what is retried, how long to wait, when to give up.

Almost every call of :class:`~batchvision.client.http.Client` is safe to repeat (job creation
carries an ``Idempotency-Key``, parts are keyed by relative path, seal and cancel are
idempotent, the rest are reads), and those are retried the same way:

- on a connection that could not be made or broke before the answer (any method),
- on ``408`` (the body stalled on its way: nothing was stored), ``429``, ``502``, ``503`` and
  ``504``, waiting what ``Retry-After`` asks when it is sent,
- otherwise after an exponential backoff with jitter (``backoff_s`` doubling up to
  ``backoff_max_s``, each wait drawn between half and all of it),
- for at most ``retry_for_s`` seconds per call: a retry that would start later is not made
  and the last answer (or error) is what the caller gets. A stream of results (or a
  download) that made progress before it broke starts a fresh ``retry_for_s``;
- never on a certificate that does not verify or TLS spoken to a plain port (no retry mends
  those).

Two calls change the job when they arrive, so a repeat of one that arrived is not the same call:

- ``DELETE /v1/jobs/{id}`` is re-sent like the others, but its repeat finds the job already
  gone: the client takes a ``404`` as success when an earlier try may have reached the server
  (:func:`may_have_arrived`).
- ``POST /v1/jobs/{id}/retry`` requeues images and then answers ``409 job_running`` to a
  repeat, so it is made with ``Budget(resend=False)``: re-sent only when no earlier try can
  have arrived (the connection was never made, or ``408``/``429``/``503``, which the API
  answers before doing anything; a ``503`` that comes after the requeue reads the same); a lost
  answer is the caller's error to see.

Two layers apply it with one clock. :class:`TransportRetry` is urllib3's ``Retry``, mounted on
the client's ``requests`` session: it sees connection errors and status codes. :class:`Budget`
covers what the transport cannot see: a body cut off after the headers (the response was
already handed over), streamed results, and an ``Idempotency-Key`` whose first request is
still in flight (``409 idempotency_conflict``). A call's :class:`Budget` lends its deadline
to the transport while the call runs, so both layers stop at the same moment.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProxyError, ResponseError
from urllib3.util.retry import RequestHistory, Retry

if TYPE_CHECKING:
    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

log = logging.getLogger(__name__)

#: Statuses that mean "not now" rather than "no": a body that stalled on the way, overload, a
#: gateway or the store restarting.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
#: Every method the client uses; the calls that are not safe to repeat opt out per call
#: (``Budget(resend=False)``, see the module docstring).
RETRY_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"})
#: Statuses a gateway answers after the API may have done the work (it timed out, or the
#: answer broke on its way back).
GATEWAY_STATUSES = frozenset({502, 504})

# The deadline of the call in progress in this thread, lent by Budget.active() to the transport.
_DEADLINE: ContextVar[float | None] = ContextVar("batchvision_retry_deadline", default=None)
# Whether the call in progress may be re-sent after a try that may have arrived (Budget.active()).
_RESEND: ContextVar[bool] = ContextVar("batchvision_retry_resend", default=True)


def cause_of(error: Exception | None, status: int | None) -> str:
    """A failed try's cause in a few words (urllib3's own text names its classes and the pool)."""
    if error is None:
        return f"HTTP {status}" if status is not None else "no answer"
    if isinstance(error, ProxyError):
        error = error.original_error
    reason = str(error).rsplit(": ", 1)[-1].strip("'\")( ")
    return f"{type(error).__name__} ({reason})" if reason else type(error).__name__


def may_have_arrived(error: Exception | None, status: int | None) -> bool:
    """Whether a failed try may have reached the API (and done its work): anything but a
    connection that was never made, or a "not now" status the API sends before acting."""
    if error is not None:
        if isinstance(error, ProxyError):
            error = error.original_error
        return not isinstance(error, ConnectTimeoutError)  # NewConnectionError included
    return status in GATEWAY_STATUSES


def resent_after_arrival(history: tuple[RequestHistory, ...]) -> bool:
    """Whether the answer at the end of ``history`` (a urllib3 ``Retry.history``) came to a
    repeat of a request an earlier try of which may have reached the API."""
    return any(may_have_arrived(h.error, h.status) for h in history)


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries; one instance per client, shared by both layers."""

    retry_for_s: float = 120.0
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    statuses: frozenset[int] = RETRY_STATUSES

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): exponential, jittered."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2.0 ** min(attempt, 30))
        return ceiling * random.uniform(0.5, 1.0)

    def transport(self) -> TransportRetry:
        """The urllib3 ``Retry`` to mount on a session (``HTTPAdapter(max_retries=...)``)."""
        return TransportRetry(policy=self)

    def budget(self, *, resend: bool = True) -> Budget:
        """A fresh time budget for one call (``resend``: see :class:`Budget`)."""
        return Budget(self, resend=resend)


class Budget:
    """One call's retries: a deadline ``retry_for_s`` from now and a count of waits so far.

    ``resend=False`` is for a call that is not safe to repeat: it is re-sent only when no
    earlier try can have reached the API (:func:`may_have_arrived`).
    """

    def __init__(self, policy: RetryPolicy, *, resend: bool = True) -> None:
        self.policy = policy
        self.resend = resend
        self.deadline = time.monotonic() + policy.retry_for_s
        self.attempt = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def pause(self, retry_after: float | None = None) -> bool:
        """Wait before the next try and return True, or return False at once when that try
        would start after the deadline (the caller then gives up)."""
        delay = retry_after if retry_after is not None else self.policy.backoff(self.attempt)
        if delay > self.remaining():
            return False
        self.attempt += 1
        time.sleep(delay)
        return True

    @contextmanager
    def active(self) -> Iterator[None]:
        """Lend this deadline (and whether to re-send) to the transport for the requests made
        inside the block."""
        token = _DEADLINE.set(self.deadline)
        resend = _RESEND.set(self.resend)
        try:
            yield
        finally:
            _RESEND.reset(resend)
            _DEADLINE.reset(token)


class TransportRetry(Retry):
    """urllib3's ``Retry`` with the policy's statuses, backoff and time budget.

    Counts are unlimited: time bounds the retries. A wait that would end past the deadline
    ends the retries instead (urllib3 then returns the last response, or raises
    ``MaxRetryError`` for a connection that never answered).
    """

    def __init__(
        self,
        *args: Any,
        policy: RetryPolicy | None = None,
        started: float | None = None,
        planned_s: float = 0.0,
        **kw: Any,
    ) -> None:
        self.policy = policy or RetryPolicy()
        if not args and "total" not in kw:
            kw.update(
                total=None,
                connect=None,
                read=None,
                status=None,
                other=0,  # TLS and other errors that a retry does not fix
                redirect=None,
                allowed_methods=RETRY_METHODS,
                status_forcelist=self.policy.statuses,
                raise_on_status=False,
                respect_retry_after_header=True,
                retry_after_max=int(self.policy.retry_for_s) + 1,
            )
        super().__init__(*args, **kw)
        #: When the first failure of the current request happened (budget without a Budget).
        self.started = started
        #: The wait chosen by the last increment(); sleep() waits exactly this.
        self.planned_s = planned_s

    def new(self, **kw: Any) -> Self:
        kw.setdefault("policy", self.policy)
        kw.setdefault("started", self.started)
        return super().new(**kw)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        status = response.status if response is not None else None
        if not _RESEND.get() and may_have_arrived(error, status):
            if error is not None:
                raise error.with_traceback(_stacktrace)  # as urllib3 does for a method it must not repeat
            raise MaxRetryError(_pool, url, ResponseError(f"HTTP {status}: not re-sent"))  # type: ignore[arg-type]
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        now = time.monotonic()
        started = self.started if self.started is not None else now
        deadline = _DEADLINE.get()
        if deadline is None:
            deadline = started + self.policy.retry_for_s
        retry_after = self.get_retry_after(response) if response is not None else None
        wait = retry_after if retry_after else self.policy.backoff(len(new.history) - 1)
        if now + wait > deadline:
            reason = error or ResponseError(f"gave up retrying after {self.policy.retry_for_s:.0f}s")
            raise MaxRetryError(_pool, url, reason) from reason  # type: ignore[arg-type]
        new.started = started
        new.planned_s = wait
        log.info(
            "retrying %s %s after %s: next try in %.1f s (giving up in %.0f s)",
            method,
            urlsplit(url or "").path or url,
            cause_of(error, status),
            wait,
            deadline - now,
        )
        return new

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        if self.planned_s > 0:
            time.sleep(self.planned_s)
