"""The Redis key space: every key batchvision reads or writes is named here, and only here.

One prefix, ``bv:``. Every key of one job carries the ``{job_id}`` hash tag, so a job's keys
hash to one Redis Cluster slot. Redis Cluster is not supported all the same: the job scripts
also touch the global counters and sets below (``bv:active``, ``bv:pending``...), which carry
no tag; one Redis (with a replica) holds them all.

==============================  ====================================================================
key                             what it holds
==============================  ====================================================================
``bv:job:{id}``                 hash ``total done failed canceled sealed cancel created_at finished_at
                                model owner retries``, and for a job with a completion webhook ``cb_url
                                cb_status_url cb_state cb_attempts cb_last_status cb_last_error
                                cb_last_attempt_at cb_delivered_at``, options ``version top_k min_score
                                priority scores``
``bv:job:{id}:files``           hash index -> filename (display name); ``s:<index>`` -> the bytes of
                                its blob, while it waits for a result
``bv:job:{id}:paths``           hash file key (relative path) -> index (idempotent parts)
``bv:job:{id}:res``             hash index -> result JSON (written once, with ``HSETNX``)
``bv:job:{id}:tries``           hash ``chunk:<first index>`` / ``image:<index>`` -> deliveries
``bv:tomb:{id}``                the job finished and its results expired (``410 Gone``)
``bv:blob:{id}:<index>``        the uploaded bytes of one image, until its result is stored (a
                                retryable error's: until it expires, for a retry); for an image named
                                by URL, ``BV-URL\n<url>`` (the worker fetches it)
``bv:kept-blobs``               sorted set ``<job>:<index>`` -> when (s): the blobs a file or S3 blob store
                                keeps for a retry of an image with a retryable error, until they are
                                reaped (those stores do not expire anything themselves)
``bv:kept-blobs:reaping``       sorted set ``<job>:<index>`` -> when: kept blobs a worker is deleting
                                (taken up again after 10 minutes if it did not finish)
``bv:pending``                  counter: accepted images without a result, over all jobs
``bv:active``                   sorted set: job ids not finished yet -> when an open upload expires
                                (``+inf`` once sealed), so expired uploads are found and released
``bv:active:pending``           hash job id -> its images without a result, ``<id>:b`` -> their bytes,
                                ``<id>:o`` -> the job's owner (what a release gives back, once)
``bv:pending:bytes``            counter: bytes of accepted images without a result, over all jobs
``bv:quota``                    hash ``i:<owner>`` / ``b:<owner>`` -> one API key's images / bytes
                                without a result (per-key quotas)
``bv:quota:held``               sorted set ``<id>:<images>:<bytes>:<owner>`` -> when it lapses (ms):
                                what admitted requests hold until their writes count it
``bv:batches``                  list of recent batches (size, jobs, model, version), newest first
``bv:chunks``                   sorted set ``<job>:<i,j,..>`` -> sent/started time (chunk ledger)
``bv:chunks:takers``            hash ``<job>:<i,j,..>`` -> the worker that runs that chunk (Redis broker)
``bv:alive:<worker>``           a worker process is alive (refreshed by it, expires a few beats after
                                it died): its chunks in ``bv:chunks:takers`` are sent again once gone
``bv:takers``                   set of the workers that may be takers (each adds itself as it beats)
``bv:sweep-lock``               one worker sweeps the chunk ledger at a time
``bv:parts:unconfirmed``        sorted set ``<job>:<first>:<last>`` -> when: the indexes a part added to
                                an open job, until its refusals and ledger entries are written
``bv:chunks:failed``            sorted set ``<job>:<i,j,..>`` -> when to send again a chunk whose task
                                gave up (Redis broker; RabbitMQ has its dead-letter queue)
``bv:chunk-resends:<member>``   how many times in a row that chunk was sent again (expires an hour
                                after its last failure)
``bv:finished``                 pub/sub channel: a job id, once, when that job finishes
``bv:idem:<owner>:<digest>``    ``pending`` or the job id created under an ``Idempotency-Key``
``bv:rate:<owner>:<minute>``    requests of one API key in one minute
``bv:webhooks``                 sorted set job id -> when its webhook is due (ms); the finish step
                                adds it, a deliverer's lease moves it, delivery or giving up
                                removes it (see ``batchvision/server/webhooks.py``)
``bv:exports``                  sorted set job id -> when its output files are due (ms): the finish step
                                adds a job with an ``out_url``, an exporter's lease moves it, the
                                written files (or giving up) remove it (``batchvision/server/exports.py``)
``bv:webhook-secret``           the server's webhook secret when ``WEBHOOK_SECRET`` is unset
``bv:models``                   hash model name -> JSON: versions (loaded or refused, with the reason),
                                live version, input size, classes (written by the workers)
``bv:models:live:<name>``       the live version an operator chose (rollback); absent: the newest
``bv:models:workers:<name>``    sorted set worker -> last heartbeat, of the workers serving a model
``bv:models:served:<name>``     hash worker -> the version it has live
``bv:models:control``           pub/sub channel: reload requests for the workers
==============================  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "bv"
PENDING = f"{PREFIX}:pending"
ACTIVE = f"{PREFIX}:active"
#: Images without a result, per active job (so an expired upload releases exactly its own).
ACTIVE_PENDING = f"{PREFIX}:active:pending"
#: Bytes of accepted images without a result, over all jobs (the byte budget).
PENDING_BYTES = f"{PREFIX}:pending:bytes"
#: Per API key: ``i:<owner>`` images and ``b:<owner>`` bytes without a result.
QUOTA = f"{PREFIX}:quota"
#: Images and bytes admitted but not yet counted, one member per request (:mod:`~batchvision.server.quotas`).
QUOTA_HELD = f"{PREFIX}:quota:held"
#: ``KEYS`` of the release script (:data:`batchvision.server.lua.RELEASE`).
RELEASE_KEYS = [ACTIVE, PENDING, ACTIVE_PENDING, PENDING_BYTES, QUOTA]
BATCH_LOG = f"{PREFIX}:batches"
CHUNKS = f"{PREFIX}:chunks"
#: Blobs kept for a retry in a store that does not expire them: ``<job>:<index>`` -> deadline (s).
KEPT_BLOBS = f"{PREFIX}:kept-blobs"
#: ... and those a worker is deleting: ``<job>:<index>`` -> when it began (s).
KEPT_BLOBS_REAPING = f"{PREFIX}:kept-blobs:reaping"
SWEEP_LOCK = f"{PREFIX}:sweep-lock"
#: Chunk ledger member -> the worker running it (see :class:`batchvision.server.liveness.Liveness`).
CHUNK_TAKERS = f"{PREFIX}:chunks:takers"
#: The workers that may be takers in it: whose keys the sweepers look at.
TAKERS = f"{PREFIX}:takers"
FAILED_CHUNKS = f"{PREFIX}:chunks:failed"
#: Indexes a part added to an open job whose refusals and ledger entries are not written yet
#: (see :func:`batchvision.server.recovery.confirm_parts`).
UNCONFIRMED_PARTS = f"{PREFIX}:parts:unconfirmed"


def worker_alive(worker: str) -> str:
    """Exists while the worker process ``worker`` (a unique id per process) beats."""
    return f"{PREFIX}:alive:{worker}"


def chunk_resends(member: str) -> str:
    """Resends of the failed chunk ``member`` (its ledger member)."""
    return f"{PREFIX}:chunk-resends:{member}"


#: Pub/sub channel on which the job scripts announce each finished job id (API waiters listen).
FINISHED = f"{PREFIX}:finished"


def reply_channel(listener: str) -> str:
    """The pub/sub channel of one API process's waiter (``listener``: its random id), on which
    the finish of a job it waits to answer with comes with the job's rows."""
    return f"{FINISHED}:{listener}"


#: Pending webhook deliveries: job id -> due time in milliseconds (a lease while one is sent).
WEBHOOKS = f"{PREFIX}:webhooks"
#: Jobs whose output files are due: id -> when (ms); see batchvision/server/exports.py.
EXPORTS = f"{PREFIX}:exports"
#: Jobs of an ``s3://`` prefix with more to list: id -> when (ms); see batchvision/server/listing.py.
LISTINGS = f"{PREFIX}:listings"
#: The generated server webhook secret (only when ``BATCHVISION_WEBHOOK_SECRET`` is unset).
WEBHOOK_SECRET = f"{PREFIX}:webhook-secret"


#: Several models: the registry the workers write and the API reads.
MODELS = f"{PREFIX}:models"
MODELS_CONTROL = f"{PREFIX}:models:control"


def owner_jobs(owner: str) -> str:
    """An API key's jobs: a sorted set of job ids scored by creation time (``GET /v1/jobs``)."""
    return f"{PREFIX}:owner-jobs:{owner}"


def model_live(name: str) -> str:
    return f"{PREFIX}:models:live:{name}"


def model_workers(name: str) -> str:
    return f"{PREFIX}:models:workers:{name}"


def model_served(name: str) -> str:
    return f"{PREFIX}:models:served:{name}"


def blob(job_id: str, index: int) -> str:
    return f"{PREFIX}:blob:{{{job_id}}}:{index}"


def blob_pattern(job_id: str) -> str:
    """A ``SCAN`` pattern matching every blob of a job."""
    return f"{PREFIX}:blob:{{{job_id}}}:*"


def idempotency(owner: str, key_digest: str) -> str:
    return f"{PREFIX}:idem:{owner}:{key_digest}"


def rate(owner: str, minute: int) -> str:
    return f"{PREFIX}:rate:{owner}:{minute}"


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job. :meth:`lua` is the one ``KEYS`` order of every job script."""

    job: str
    files: str
    paths: str
    results: str
    tries: str
    tomb: str

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        base = f"{PREFIX}:job:{{{job_id}}}"
        return cls(
            job=base,
            files=f"{base}:files",
            paths=f"{base}:paths",
            results=f"{base}:res",
            tries=f"{base}:tries",
            tomb=f"{PREFIX}:tomb:{{{job_id}}}",
        )

    def data(self) -> tuple[str, ...]:
        """The keys that hold the job's data (all but the tombstone), which expire together."""
        return (self.job, self.files, self.paths, self.results, self.tries)

    def lua(self) -> list[str]:
        """``KEYS`` for a job script, in the order :data:`LUA_KEYS` names them."""
        # Not dataclasses.astuple: it deep-copies each field, and this runs for every job script.
        shared = [ACTIVE, PENDING, WEBHOOKS, ACTIVE_PENDING, PENDING_BYTES, QUOTA, EXPORTS]
        return [*self.data(), self.tomb, *shared]


#: Prepended to every job script: names for ``KEYS`` in :meth:`JobKeys.lua`'s order.
LUA_KEYS = (
    "local K_JOB, K_FILES, K_PATHS, K_RES, K_TRIES, K_TOMB, K_ACTIVE, K_PENDING, K_WEBHOOKS,"
    " K_JOBPENDING, K_PENDING_BYTES, K_QUOTA, K_EXPORTS = unpack(KEYS)\n"
    "local K_DATA = {K_JOB, K_FILES, K_PATHS, K_RES, K_TRIES}\n"
    f"local CH_FINISHED = '{FINISHED}'\n"
)
