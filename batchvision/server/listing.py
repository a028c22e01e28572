"""Jobs made from an ``s3://`` prefix: listed a page at a time, the rest by any worker, resumable.

The API lists the first page within the request (``BATCHVISION_LIST_PAGE_SIZE`` images), so a
bucket that does not exist, a denied listing or a prefix without images is refused before a
job exists, and a small prefix is one sealed job at once. When the prefix has more, the job
stays open and joins :data:`~batchvision.server.keys.LISTINGS`; a :class:`Lister` thread in
every worker process leases it (:mod:`batchvision.server.leases`), lists the next page after
the last key done, adds its images to the job (which queues them) and moves the cursor while
the lease is still its own; the last page seals the job. A listing of millions of keys never
holds more than a page, and the API's request stays short.

**Exactly once**: an image is added by its key, and a key the job has keeps its index and is
not queued again (:meth:`JobStore.add_files <batchvision.server.store.JobStore.add_files>`), so
a worker killed between adding a page and moving the cursor leaves the next holder to add
that page again at no cost.

**Failures**: throttling and an unreachable store are retried with backoff
(``ls_error`` says why) up to :data:`MAX_TRANSIENT` times in a row (about an hour); a full
queue (``429``) waits for room and keeps the open job alive meanwhile, as does a job written in
parts whose parts the output store does not take (:mod:`~batchvision.server.exports`). A
refusal (access denied, the bucket deleted), passing ``BATCHVISION_MAX_OBJECTS_PER_JOB``, or a
prefix that turned out to hold no image cancels the job (its images so far get ``canceled``
results) with ``ls_state`` ``failed`` and the reason in ``ls_error``.

Its job-hash fields and their document: :mod:`batchvision.server.sources`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import kombu.exceptions
import redis

from batchvision.core.errors import BatchvisionError, TooManyRequests
from batchvision.server import failpoints, keys
from batchvision.server.backoff import backoff
from batchvision.server.keys import JobKeys
from batchvision.server.leases import IF_OURS, Lease, LeasedWorker, due_again_if, now_ms
from batchvision.server.s3 import S3, S3Error, S3Url
from batchvision.server.sources import DONE, FAILED, LISTING, Page, is_image_key, too_many
from batchvision.server.store import JobStore
from batchvision.server.text import hash_fields

log = logging.getLogger(__name__)

#: Objects looked at per page, at most, in multiples of the page's images: a prefix of mostly
#: other files still moves on in bounded steps.
SCAN_FACTOR = 10
#: Throttled or failed listings in a row before the job fails: with the pause doubling from
#: 1 s up to a minute, an outage of the store of about an hour (a job canceled for a shorter
#: one would lose the images it already had queued).
MAX_TRANSIENT = 80
#: What :meth:`Lister.step` returns for a job that is gone, or held by another process.
DROPPED = "dropped"
#: The ``ls_error`` of a listing its job's cancellation stopped.
CANCELED = "canceled: the job was canceled before its listing ended"

#: The job-hash fields a step reads.
STEP_FIELDS = (
    *("ls_url", "ls_after", "ls_state", "ls_images", "ls_attempts"),
    *("owner", "sealed", "cancel", "total", "done", "failed", "canceled"),
    *("part_rows", "spilled", "op_attempts"),
)
#: How soon a listing that waits for the workers to catch up looks again (ms).
AHEAD_WAIT_MS = 250
#: Record a step while the lease is ours. KEYS: the set, the job hash. ARGV: job id, lease,
#: state (``listing``: due again at ARGV[4]; ``done``, ``failed``: leave the set; ``dropped``:
#: leave the set, the job hash untouched), due, the new cursor ('' keeps it), images and
#: skipped keys added, error, whether the attempt failed ('1') or not.
RECORD = (
    IF_OURS
    + """
if ARGV[3] == 'dropped' or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'ls_after', ARGV[5]) end
redis.call('HINCRBY', KEYS[2], 'ls_images', ARGV[6])
redis.call('HINCRBY', KEYS[2], 'ls_skipped', ARGV[7])
redis.call('HSET', KEYS[2], 'ls_state', ARGV[3], 'ls_error', ARGV[8])
if ARGV[9] == '1' then
  redis.call('HINCRBY', KEYS[2], 'ls_attempts', 1)
else
  redis.call('HSET', KEYS[2], 'ls_attempts', 0)
end
"""
    + due_again_if(LISTING)
)


def read_page(s3: S3, url: S3Url, after: str, size: int, *, named: int = 100) -> Page:
    """The next page of ``url``'s objects after the key ``after`` (``""``: from the start): up
    to ``size`` images, having looked at no more than ``SCAN_FACTOR * size`` objects. Raises
    :class:`~batchvision.server.s3.S3Error`."""
    images: list[str] = []
    skipped: list[str] = []
    skipped_count = 0
    last = after
    # As a folder: the allow-list admitted s3://b/photos/, never s3://b/photos-private/.
    objects = s3.list(url.folder, page_size=min(1000, max(size, 1)), after=after)
    for seen, obj in enumerate(objects, start=1):
        if is_image_key(obj.key):
            images.append(obj.key)
        else:
            skipped_count += 1
            if len(skipped) < named:
                skipped.append(obj.key)
        last = obj.key
        if len(images) >= size or seen >= SCAN_FACTOR * size:
            # One more object says whether the prefix goes on (the next page lists it again).
            more = next(objects, None) is not None
            return Page(tuple(images), tuple(skipped), skipped_count, last, more)
    return Page(tuple(images), tuple(skipped), skipped_count, last, False)


#: Adds listed keys to a job: (job id, owner, prefix, keys) -> images new to the job; raises
#: ``TooManyRequests`` (no room now), another ``BatchvisionError`` (never room),
#: ``PermissionError`` (canceled or sealed) or ``LookupError`` (gone). See
#: :meth:`Intake.add_listed <batchvision.server.intake.Intake.add_listed>`.
AddListed = Callable[[str, str, S3Url, Sequence[str]], int]


class Lister(LeasedWorker):
    """Lists due prefix jobs a page at a time; one per worker process."""

    def __init__(
        self,
        client: redis.Redis,
        store: JobStore,
        s3: Callable[[], S3],
        add: AddListed,
        *,
        page_size: int,
        max_images: int,
        ahead: int = 10_000,
        lease_s: float = 120.0,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__("lister", client, keys.LISTINGS, lease_s=lease_s, poll_s=poll_s)
        self.store = store
        self.s3 = s3
        self.add = add
        self.page_size = page_size
        self.max_images = max_images
        self.ahead = ahead
        self._record = client.register_script(RECORD)

    def handle(self, held: Lease) -> str:
        return self.step(held)

    def step(self, held: Lease) -> str:
        """List and add the next page of the job ``held``; returns the state recorded."""
        job_id = held.item
        h = hash_fields(self.redis, JobKeys.of(job_id).job, STEP_FIELDS)
        if h["ls_url"] is None or h["ls_state"] != LISTING:
            return self._write(held, DROPPED)
        if h["cancel"] not in (None, "0"):  # canceled by its owner, or by a failure of ours
            return self._write(held, FAILED, error=CANCELED)
        listed = int(h["ls_images"] or 0)
        if h["sealed"] == "1":  # the last page was added and sealed, its record never came
            return self._write(held, DONE, images=int(h["total"] or 0) - listed)
        url = S3Url.parse(h["ls_url"])
        waiting = int(h["total"] or 0) - sum(int(h[k] or 0) for k in ("done", "failed", "canceled"))
        if waiting >= self.ahead or self._parts_behind(h):
            # The workers have enough of this job in hand, or its output parts are behind: list
            # on once they caught up, so the job's share of Redis and the queue stays bounded
            # whatever the prefix holds. The open job is kept alive meanwhile, as an added page
            # would.
            self.store.touch(job_id)
            return self._write(held, LISTING, due=now_ms() + AHEAD_WAIT_MS)
        try:
            page = read_page(self.s3(), url, h["ls_after"] or "", self.page_size)
        except S3Error as exc:
            attempts = int(h["ls_attempts"] or 0) + 1
            if exc.transient and attempts < MAX_TRANSIENT:
                log.warning("job %s: listing %s failed (%s); retrying", job_id, url, exc.message)
                return self._retry(held, attempts, f"{exc.code}: {exc.message}")
            return self._fail(held, f"{exc.code}: {exc.message}")
        if not held.renew():  # listing took longer than the lease: another process has the job
            return DROPPED
        if listed + len(page.images) > self.max_images:
            return self._fail(held, "too_many_objects: " + too_many(str(url), self.max_images))
        try:
            added = self.add(job_id, h["owner"] or "", url, page.images) if page.images else 0
        except TooManyRequests as exc:
            # No room in the queue now: keep the open job alive and come back when told.
            self.store.touch(job_id)
            due = now_ms() + max(1, exc.retry_after) * 1000
            return self._write(held, LISTING, due=due, error=f"{exc.code}: {exc.message}")
        except S3Error as exc:  # the blob store in a bucket: throttled or down is retried
            if exc.transient:
                return self._retry(held, int(h["ls_attempts"] or 0) + 1, f"{exc.code}: {exc.message}")
            return self._fail(held, f"{exc.code}: {exc.message}")
        except BatchvisionError as exc:
            return self._fail(held, f"{exc.code}: {exc.message}")
        except PermissionError:  # canceled meanwhile
            return self._write(held, FAILED, error=CANCELED)
        except LookupError:  # gone
            return self._write(held, DROPPED)
        except (redis.RedisError, OSError, kombu.exceptions.KombuError) as exc:
            # Redis or the broker failed mid-page: what was stored stays (a page added again
            # counts once, and the chunk ledger re-sends what was not published); try again.
            log.warning("job %s: adding a page failed (%s); retrying", job_id, exc)
            return self._retry(held, int(h["ls_attempts"] or 0) + 1, f"unavailable: {exc}")
        failpoints.after_listed_page()
        if page.more:
            return self._write(held, LISTING, due=now_ms(), page=page)
        if int(h["total"] or 0) + added == 0:  # the job's files: pages added before a crash too
            return self._fail(held, f"no_images: no images under {url} ({page.skipped_count} other objects)")
        # Sealed before the record: a worker killed between the two leaves a sealed job, which
        # the next holder records as done (above).
        self.store.seal(job_id)
        log.info("job %s: listing of %s done, %d images", job_id, url, listed + len(page.images))
        return self._write(held, DONE, page=page)

    def _parts_behind(self, h: dict[str, str | None]) -> bool:
        """Whether a job written in parts whose last part failed to be written (the output
        store away) holds so many rows in Redis (those not written to a part yet: waiting
        images and results) that listing on would only pile up more: in normal running a job
        holds fewer than ``ahead`` waiting images plus a part being filled and a page. (A part
        held back by one slow image is not a reason: the sweep re-sends a lost chunk.)"""
        size = int(h["part_rows"] or 0)
        if not size or not int(h["op_attempts"] or 0):
            return False
        in_redis = int(h["total"] or 0) - int(h["spilled"] or 0) * size
        return in_redis >= self.ahead + 2 * size

    def _retry(self, held: Lease, attempts: int, error: str) -> str:
        due = now_ms() + int(backoff(attempts, 1.0, 60.0) * 1000)
        return self._write(held, LISTING, due=due, error=error, failed=True)

    def _fail(self, held: Lease, error: str) -> str:
        log.warning("job %s: listing failed, the job is canceled: %s", held.item, error)
        # Canceled first: a worker killed before the record leaves a canceled job, which the
        # next holder records as failed; the other order could leave an open job behind.
        self.store.cancel(held.item)
        return self._write(held, FAILED, error=error)

    def _write(
        self,
        held: Lease,
        state: str,
        *,
        due: int = 0,
        page: Page | None = None,
        images: int = 0,
        error: str = "",
        failed: bool = False,
    ) -> str:
        """Record ``state`` (and the cursor past ``page``, with its counts, or ``images`` more
        listed) while the lease is ours; the state, or :data:`DROPPED` when another process
        holds the job now. The counts move with the cursor, in one step: each page counts once,
        whether or not its images were new to the job."""
        ours = self._record(
            keys=[keys.LISTINGS, JobKeys.of(held.item).job],
            args=[
                held.item,
                held.score,
                state,
                due,
                page.last_key if page is not None else "",
                len(page.images) if page is not None else images,
                page.skipped_count if page is not None else 0,
                error[:500],
                "1" if failed else "0",
            ],
        )
        return state if ours else DROPPED
