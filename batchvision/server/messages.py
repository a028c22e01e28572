"""What travels on the queue: the chunk (a job id and some of its image indexes) and the body
of a classify message, with the one codec that writes and reads it.

A message body is Celery's ``args``; version 2 is one JSON object::

    [{"v": 2, "chunks": [["<job id>", [0, 1, 2]], ...], "enqueued_at": 1.5, "interactive": false,
      "priority": 5}]

``priority`` (0 to 9, :mod:`batchvision.core.priorities`) was added to version 2 without a new
version: a body without it (an older API) has the default priority, and an older worker reads
the body and ignores the field.

Version 1 (written by APIs before the version field existed) is the positional list
``[[["<job id>", [0, 1, 2]], ...], enqueued_at, interactive]``; it is still read. A body of any
other version is refused with :class:`MessageError`, naming the version and those this code
reads. Dicts and lists exist only here, at the edge: everything else handles
:class:`Chunk` and :class:`ClassifyMessage`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchvision.core.priorities import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY

#: The version :meth:`ClassifyMessage.to_args` writes.
MESSAGE_VERSION = 2
#: The versions :meth:`ClassifyMessage.from_args` reads.
READABLE_VERSIONS = (1, 2)


class MessageError(ValueError):
    """A classify message body this code cannot read (another version, or malformed)."""


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a job id and some of its image indexes (never image bytes)."""

    job_id: str
    indexes: tuple[int, ...]

    @classmethod
    def of(cls, job_id: str, indexes: Iterable[int]) -> Chunk:
        return cls(str(job_id), tuple(int(i) for i in indexes))

    @property
    def first(self) -> int:
        """The first index: names the chunk in the job's delivery counts (``chunk:<first>``)."""
        return self.indexes[0] if self.indexes else 0

    def __len__(self) -> int:
        return len(self.indexes)

    def describe(self) -> str:
        if not self.indexes:
            return f"job={self.job_id} images=none"
        return f"job={self.job_id} images={self.indexes[0]}..{self.indexes[-1]} n={len(self.indexes)}"


def split(job_id: str, indexes: Sequence[int], size: int) -> list[Chunk]:
    """A job's images as task-sized chunks, in order."""
    size = max(1, size)
    return [Chunk.of(job_id, indexes[i : i + size]) for i in range(0, len(indexes), size)]


@dataclass(frozen=True)
class ClassifyMessage:
    """The body of one classify message: its chunks (all of one model), when the first of
    them was queued, whether they are interactive (served first), and their priority (the
    highest of their jobs')."""

    chunks: tuple[Chunk, ...]
    enqueued_at: float | None = None
    interactive: bool = False
    priority: int = DEFAULT_PRIORITY

    @property
    def images(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def jobs(self) -> list[str]:
        """The job ids, once each, sorted."""
        return sorted({c.job_id for c in self.chunks})

    def to_args(self) -> list[Any]:
        """Celery's ``args`` of this message (the current version)."""
        return [
            {
                "v": MESSAGE_VERSION,
                "chunks": [[c.job_id, list(c.indexes)] for c in self.chunks],
                "enqueued_at": self.enqueued_at,
                "interactive": self.interactive,
                "priority": self.priority,
            }
        ]

    @classmethod
    def from_args(cls, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> ClassifyMessage:
        """Read Celery's ``args`` (and ``kwargs``) of a classify message of any readable version;
        raises :class:`MessageError` saying what is wrong."""
        try:
            if len(args) == 1 and isinstance(args[0], Mapping):
                return cls._v2(args[0])
            return cls._v1(list(args), dict(kwargs or {}))
        except MessageError:
            raise
        except (TypeError, IndexError, KeyError, ValueError) as exc:
            raise MessageError(f"not a classify message body: {exc!r}") from None

    @classmethod
    def _v2(cls, body: Mapping[str, Any]) -> ClassifyMessage:
        version = body.get("v")
        if version != MESSAGE_VERSION:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise MessageError(
                f"classify message version {version!r} is not readable by this worker "
                f"(it reads versions {readable}); upgrade the workers"
            )
        at = body.get("enqueued_at")
        return cls(
            _chunks(body["chunks"]),
            None if at is None else float(at),
            bool(body.get("interactive")),
            _priority(body.get("priority", DEFAULT_PRIORITY)),
        )

    @classmethod
    def _v1(cls, args: list[Any], kwargs: dict[str, Any]) -> ClassifyMessage:
        # [chunks, enqueued_at=None, interactive=False], the last two also as keywords
        names = ("chunks", "enqueued_at", "interactive")
        values = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        at = values.get("enqueued_at")
        return cls(
            _chunks(values["chunks"]), None if at is None else float(at), bool(values.get("interactive"))
        )


def _priority(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not MIN_PRIORITY <= raw <= MAX_PRIORITY:
        raise MessageError(f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, not {raw!r}")
    return raw


def _chunks(raw: Any) -> tuple[Chunk, ...]:
    if not isinstance(raw, list):
        raise MessageError(f"chunks must be a list of [job_id, [index, ...]], not {type(raw).__name__}")
    out = []
    for item in raw:
        job, indexes = item
        if not isinstance(job, str) or not isinstance(indexes, list):
            raise MessageError(f"a chunk must be [job_id, [index, ...]], not {item!r}"[:200])
        out.append(Chunk.of(job, indexes))
    return tuple(out)
