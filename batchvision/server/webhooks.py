"""Completion webhooks: one signed POST per job when it reaches a final status, at least once.

**Durable.** A job created with a ``callback_url`` keeps it in its hash (``cb_url``). The Lua
step that finishes the job (:data:`~batchvision.server.lua._FINISH`, the same atomic step that
stores the last result) adds the job id to the pending-deliveries sorted set
(:data:`~batchvision.server.keys.WEBHOOKS`, score: when it is due, in milliseconds). Nothing
is held in a process's memory: a worker killed at any point loses no delivery.

**Delivered** by a :class:`Deliverer` thread in every worker process. It takes due entries
with a lease (one Lua step moves their score to ``now + lease``, so no other deliverer takes
them meanwhile), POSTs, and records the attempt on the job (``cb_attempts``, ``cb_last_status``,
``cb_last_error``, ``cb_delivered_at``, ``cb_state``) in one Lua step that checks the lease is
still its own. A deliverer that dies mid-delivery leaves the entry to come due again when the
lease runs out, and another process sends it: at least once. The webhook of a job with an
output prefix waits (``deferred``: due again, no attempt counted) while its output files are
written, so that the receiver finds them, and goes with ``output.state`` ``pending`` if they
are not final ``OUTPUT_WAIT_MARGIN_S`` before the job expires. Receivers deduplicate on the
``Batchvision-Delivery`` header (the job id, the same on every attempt; a job retried after it
finished ends again, and that end's delivery is ``<job id>.<n>``: :func:`delivery_id`).

**Retried** with exponential backoff and jitter (:func:`backoff`) on connection errors,
timeouts, ``408``, ``429`` and ``5xx``, until ``WEBHOOK_RETRY_FOR_S`` after the job finished
(or its output was written; capped by the result TTL, after which the job is gone); any other
answer (``3xx``, ``4xx``) and a refused address end it as ``failed``. The receiver's address
passes the same rules as image URLs (:mod:`batchvision.server.fetch`), checked on every attempt.

**Signed** like Stripe's webhooks: ``Batchvision-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256(secret, "<t>." + body)>``. The secret is per API key, derived from
``WEBHOOK_SECRET`` and the key's owner id (:func:`signing_secret`); ``GET /v1/webhook-secret``
tells a key its own. :func:`verify` is the receiver's check.

**Fair.** A process makes at most ``WEBHOOK_PER_KEY`` deliveries of one API key at a time (of its
``concurrency`` slots): callbacks of one key that hang hold that many slots for a timeout each,
and the due deliveries of other keys are taken past them (:data:`CLAIM`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from batchvision.core.results import status_of
from batchvision.core.settings import Settings
from batchvision.server import keys
from batchvision.server.backoff import backoff, retry_after
from batchvision.server.fetch import Deadline, FetchError, SafeHTTP, parse_url, read_body
from batchvision.server.keys import JobKeys
from batchvision.server.leases import IF_OURS, due_again_if
from batchvision.server.outputs import output_document
from batchvision.server.text import as_text, hash_fields

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Batchvision-Signature"
DELIVERY_HEADER = "Batchvision-Delivery"
EVENT_HEADER = "Batchvision-Event"
ATTEMPT_HEADER = "Batchvision-Attempt"
EVENT = "job.finished"
#: How old a signature a receiver should accept (replay window), in seconds.
TOLERANCE_S = 300
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0
#: Codes of failed attempts that are retried (plus 408, 429 and 5xx answers).
RETRIED = frozenset({"fetch_timeout", "connection_failed", "dns_error"})
#: The job hash fields of a callback (all ``cb_``-prefixed).
FIELDS = (
    "cb_url",
    "cb_state",
    "cb_attempts",
    "cb_last_status",
    "cb_last_error",
    "cb_last_attempt_at",
    "cb_delivered_at",
)


# -- signing (pure) ------------------------------------------------------------------------------


def signing_secret(server_secret: bytes, owner: str) -> str:
    """The signing secret of one API key (``owner``: its id, ``""`` without keys)."""
    digest = hmac.new(server_secret, b"batchvision-webhook\0" + owner.encode(), hashlib.sha256)
    return "whsec_" + digest.hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Batchvision-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S, now: float | None = None
) -> bool:
    """The receiver's check: a ``v1`` signature of ``body`` under ``secret``, at most
    ``tolerance_s`` old (constant-time comparison). Any malformed header (missing, not text,
    not ASCII, without ``t`` or ``v1``) is ``False``, never an exception."""
    if not isinstance(header, str) or not header.isascii():
        return False
    try:
        parts = dict(item.strip().split("=", 1) for item in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


# -- state in Redis -------------------------------------------------------------------------------

_secret_cache: dict[tuple[int, str], bytes] = {}


def server_secret(client: redis.Redis, configured: str) -> bytes:
    """``WEBHOOK_SECRET``, or (unset) a random secret made once and shared through Redis."""
    if configured:
        return configured.encode()
    key = (id(client.connection_pool), configured)
    if key not in _secret_cache:
        client.set(keys.WEBHOOK_SECRET, secrets.token_hex(32), nx=True)
        value = client.get(keys.WEBHOOK_SECRET)
        _secret_cache[key] = value if isinstance(value, bytes) else str(value).encode()
    return _secret_cache[key]


def owner_secret(client: redis.Redis, settings: Settings, owner: str) -> str:
    """The signing secret of ``owner`` (an API key's id)."""
    return signing_secret(server_secret(client, settings.webhook_secret.get_secret_value()), owner)


def callback_fields(url: str, status_url: str | None) -> dict[str, str]:
    """What a new job's hash gets for its callback (the intake writes them with the job)."""
    fields = {"cb_url": url, "cb_state": "waiting", "cb_attempts": "0"}
    if status_url:
        fields["cb_status_url"] = status_url
    return fields


def callback_state(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The job's ``callback`` document (``None`` for a job without one)."""
    fields = hash_fields(client, JobKeys.of(job_id).job, FIELDS)
    return callback_document({k: v for k, v in fields.items() if v is not None})


def callback_document(fields: dict[str, str]) -> dict[str, Any] | None:
    """The ``callback`` document from a job hash's ``cb_*`` fields (``None`` without a callback)."""
    if not fields.get("cb_url"):
        return None
    h = {name: fields.get(name, "") for name in FIELDS}
    return {
        "url": h["cb_url"],
        "state": h["cb_state"] or "waiting",
        "attempts": int(h["cb_attempts"] or 0),
        "last_status": int(h["cb_last_status"]) if h["cb_last_status"] else None,
        "last_error": h["cb_last_error"] or None,
        "last_attempt_at": float(h["cb_last_attempt_at"]) if h["cb_last_attempt_at"] else None,
        "delivered_at": float(h["cb_delivered_at"]) if h["cb_delivered_at"] else None,
    }


#: Take up to ARGV[3] due deliveries (score <= ARGV[1], ms) and lease them until ARGV[1] + ARGV[2],
#: at most ARGV[4] per owner (API key) counting the ARGV[7..] pairs (owner, deliveries this
#: process has in flight; the owner ``""`` of an API without keys has no limit). Among the first
#: ARGV[5] due entries, those of an owner at its limit are
#: due again ARGV[6] ms later, so the entries of other owners behind them come up. Returns
#: {id, owner, id, owner, ...}.
CLAIM = """
local busy = {}
for i = 7, #ARGV, 2 do busy[ARGV[i]] = tonumber(ARGV[i + 1]) end
local now, free, per_key = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
local lease = now + tonumber(ARGV[2])
local out = {}
local taken = 0
for _, id in ipairs(due) do
  if taken >= free then break end
  local owner = redis.call('HGET', '@JOB@{' .. id .. '}', 'owner') or ''
  local n = busy[owner] or 0
  if owner == '' or n < per_key then
    busy[owner] = n + 1
    taken = taken + 1
    redis.call('ZADD', KEYS[1], 'XX', lease, id)
    out[#out + 1] = id
    out[#out + 1] = owner
  else
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[6]), id)
  end
end
return out
""".replace("@JOB@", f"{keys.PREFIX}:job:")
#: A job with an output prefix: its webhook waits for the output, looking again every
#: ``OUTPUT_POLL_S`` at first and at most every ``OUTPUT_POLL_MAX_S``, until this long before the
#: job expires (then it goes with the output still pending).
OUTPUT_POLL_S = 0.5
OUTPUT_POLL_MAX_S = 30.0
OUTPUT_WAIT_MARGIN_S = 600.0
#: Due entries one claim looks at, and how long an entry of an owner at its limit waits.
CLAIM_SCAN = 1000
BUSY_DEFER_MS = 1000

#: Record an attempt, only while the lease (ARGV[2]) is still ours. KEYS: pending set, job hash.
#: ARGV: job id, lease, state (delivered, retrying, failed; gone: drop the entry; deferred: not
#: sent, due again), next due (ms), now, status, error.
RECORD = (
    IF_OURS
    + """
if ARGV[3] == 'gone' or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
if ARGV[3] == 'deferred' then  -- not sent yet (its output is being written): no attempt counted
  redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[1])
  return 1
end
redis.call('HINCRBY', KEYS[2], 'cb_attempts', 1)
redis.call('HSET', KEYS[2], 'cb_state', ARGV[3], 'cb_last_attempt_at', ARGV[5],
           'cb_last_status', ARGV[6], 'cb_last_error', ARGV[7])
if ARGV[3] == 'delivered' then redis.call('HSET', KEYS[2], 'cb_delivered_at', ARGV[5]) end
"""
    + due_again_if("retrying")
)


def payload(job_id: str, h: dict[str, str]) -> dict[str, Any]:
    """The POSTed document: the job as ``GET /v1/jobs/{id}`` shows it (without ``callback``),
    and the delivery's id, signed with the body (the ``Batchvision-Delivery`` header is not:
    a receiver that deduplicates on the header could be sent a recorded delivery again under
    a new id within the signature's tolerance)."""
    status, counts = status_of(h)
    doc: dict[str, Any] = {
        "delivery_id": delivery_id(job_id, h),
        "job_id": job_id,
        "status": status.value,
        **counts,
        "created_at": float(h["created_at"]) if h.get("created_at") else None,
        "finished_at": float(h["finished_at"]) if h.get("finished_at") else None,
        "model": h.get("model", ""),
    }
    if h.get("cb_status_url"):
        doc["status_url"] = h["cb_status_url"]
        doc["results_url"] = h["cb_status_url"] + "/results"
    output = output_document(h)
    if output is not None:  # final, unless the job neared its expiry first (Deliverer._output_pending)
        doc["output"] = output
    return doc


def delivery_id(job_id: str, h: dict[str, str]) -> str:
    """The ``Batchvision-Delivery`` of a job's webhook (``h``: the job hash), the same on every
    attempt: the job id, and ``<job id>.<n>`` for the end that follows its ``n``-th retry (each
    end is an event of its own, which receivers must not drop as a duplicate)."""
    retries = int(h.get("retries") or 0)
    return f"{job_id}.{retries}" if retries else job_id


class Deliverer:
    """Sends due webhooks; one per worker process, any number of processes."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        http: SafeHTTP,
        *,
        poll_s: float = 0.5,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.http = http
        self.poll_s = poll_s
        self.concurrency = concurrency
        self.clock = clock
        self.timeout_s = settings.webhook_timeout_s
        self.lease_ms = int((settings.webhook_timeout_s + 5.0) * 1000)
        self._claim = client.register_script(CLAIM)
        self._record = client.register_script(RECORD)
        self._slots = threading.Semaphore(concurrency)
        self.per_key = settings.webhook_per_key
        self._inflight: Counter[str] = Counter()  # owner -> deliveries running here
        self._inflight_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="webhook")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-deliverer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                started = self.run_once()
            except redis.RedisError as exc:
                log.warning("webhook deliverer: Redis unavailable (%s); retrying", exc)
                started = 0
            self._stop.wait(0.05 if started else self.poll_s)

    def run_once(self) -> int:
        """Lease the due deliveries this process has room for and start them; returns how many."""
        free = 0
        while free < self.concurrency and self._slots.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        now_ms = int(self.clock() * 1000)
        with self._inflight_lock:
            busy = [str(v) for owner, n in self._inflight.items() for v in (owner, n)]
        args: list[str | int] = [now_ms, self.lease_ms, free, self.per_key, CLAIM_SCAN, BUSY_DEFER_MS, *busy]
        try:
            raw = [as_text(v) for v in self._claim(keys=[keys.WEBHOOKS], args=args)]
        except BaseException:
            for _ in range(free):
                self._slots.release()
            raise
        due = list(zip(raw[::2], raw[1::2], strict=True))
        for _ in range(free - len(due)):
            self._slots.release()
        lease = now_ms + self.lease_ms
        with self._inflight_lock:
            self._inflight.update(owner for _, owner in due)
        for job_id, owner in due:
            self._pool.submit(self._deliver_then_release, job_id, lease, owner)
        return len(due)

    def inflight(self, owner: str) -> int:
        """Deliveries of ``owner`` this process is making now."""
        with self._inflight_lock:
            return self._inflight[owner]

    def _deliver_then_release(self, job_id: str, lease: int, owner: str = "") -> None:
        try:
            self.deliver(job_id, lease)
        except Exception:
            log.exception("webhook of job %s: delivery failed unexpectedly; retried after the lease", job_id)
        finally:
            with self._inflight_lock:
                self._inflight[owner] -= 1
                if self._inflight[owner] <= 0:
                    del self._inflight[owner]
            self._slots.release()

    # -- one delivery -------------------------------------------------------------------------

    def deliver(self, job_id: str, lease: int) -> str:
        """One attempt for ``job_id`` under ``lease``; returns the state it recorded."""
        raw = self.redis.hgetall(JobKeys.of(job_id).job)
        h = {as_text(k): as_text(v) for k, v in raw.items()}
        if not h.get("cb_url") or h.get("cb_state") in ("delivered", "failed"):
            self._write(job_id, lease, "gone", 0, "", "")  # expired, or already final
            return "gone"
        now = self.clock()
        later = self._output_pending(h, now)
        if later is not None:
            self._write(job_id, lease, "deferred", int(later * 1000), "", "")
            return "deferred"
        attempt = int(h.get("cb_attempts") or 0) + 1
        body = json.dumps(payload(job_id, h), separators=(",", ":")).encode()
        secret = owner_secret(self.redis, self.settings, h.get("owner", ""))
        status, error, asked = self._post(h["cb_url"], body, secret, delivery_id(job_id, h), attempt)
        now = self.clock()
        if 200 <= status < 300:
            state, due_ms = "delivered", 0
        elif error in RETRIED or status in (408, 429) or status >= 500:
            finished = float(h.get("finished_at") or now)
            # The window opens when there was something to send (the output written, for a job
            # whose webhook waited for it), and closes by the time the job expires.
            opened = max(finished, float(h.get("out_written_at") or 0))
            give_up = min(opened + self.settings.webhook_retry_for_s, finished + self.settings.result_ttl_s)
            own = backoff(attempt, FIRST_BACKOFF_S, MAX_BACKOFF_S)
            wait = max(own, asked or 0.0)  # never sooner than the receiver asked
            state = "retrying" if now + wait <= give_up else "failed"
            if state == "failed" and now + own <= give_up:
                error = "retry_after_too_late"  # the receiver's Retry-After ends past the window
            due_ms = int((now + wait) * 1000)
        else:
            state, due_ms = "failed", 0
        self._write(job_id, lease, state, due_ms, str(status or ""), error)
        log.info(
            "webhook of job %s, attempt %d: %s (%s)",
            job_id,
            attempt,
            state,
            status or error,
            extra={"job_id": job_id, "attempt": attempt, "state": state},
        )
        return state

    def _output_pending(self, h: dict[str, str], now: float) -> float | None:
        """When to look again at a job whose output files are still being written (its webhook
        tells the receiver they are there), or ``None`` to send now: the output is final, or the
        job expires within :data:`OUTPUT_WAIT_MARGIN_S` (the webhook then goes with
        ``output.state`` ``pending``: late news is better than none)."""
        if not h.get("out_url") or h.get("out_state", "pending") != "pending":
            return None
        finished = float(h.get("finished_at") or now)
        if now >= finished + self.settings.result_ttl_s - min(
            OUTPUT_WAIT_MARGIN_S, self.settings.result_ttl_s / 2
        ):
            return None
        # Soon after the end at first (the files of a small job take a moment), then less often.
        return now + min(max(OUTPUT_POLL_S, (now - finished) / 10), OUTPUT_POLL_MAX_S)

    def _post(
        self, url: str, body: bytes, secret: str, delivery: str, attempt: int
    ) -> tuple[int, str, float | None]:
        """POST ``body`` as ``delivery``: ``(HTTP status, "" or "http_<status>", the seconds
        its ``Retry-After`` asks to wait or None)``, or ``(0, error code, None)``."""
        with Deadline(self.timeout_s) as deadline:
            return self._post_within(deadline, url, body, secret, delivery, attempt)

    def _post_within(
        self, deadline: Deadline, url: str, body: bytes, secret: str, delivery: str, attempt: int
    ) -> tuple[int, str, float | None]:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, body),
            DELIVERY_HEADER: delivery,
            EVENT_HEADER: EVENT,
            ATTEMPT_HEADER: str(attempt),
        }
        try:
            resp = self.http.open("POST", parse_url(url), deadline, body=body, headers=headers)
        except FetchError as exc:
            return 0, exc.code, None
        try:
            read_body(resp, 64 * 1024, deadline)  # the answer's body is not used: its status is
        except FetchError:
            pass
        ok = 200 <= resp.status < 300
        return resp.status, "" if ok else f"http_{resp.status}", None if ok else retry_after(resp.headers)

    def _write(self, job_id: str, lease: int, state: str, due_ms: int, status: str, error: str) -> None:
        args: list[str | int] = [job_id, lease, state, due_ms, f"{self.clock():.3f}", status, error]
        self._record(keys=[keys.WEBHOOKS, JobKeys.of(job_id).job], args=args)
