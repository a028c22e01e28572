"""Which ``s3://`` locations a job may name (``BATCHVISION_S3_ALLOW``): pure, no I/O.

The service reaches buckets with one identity (its role or keys), so without a scope any API
key could read or write whatever that identity can: other tenants' inputs, the blob store that
holds every upload, the model repository. A job's source prefix, manifest, image entries and
output prefix must therefore lie under an allowed location:

- ``*``: any bucket (a single-tenant deployment whose role is scoped already);
- ``s3://bucket``: anything in the bucket;
- ``s3://bucket/prefix/``: keys under that folder (``s3://bucket/prefix`` means the same: a
  prefix is a folder, so ``photos`` never admits ``photos-private/``).

Empty (the default): jobs may name no bucket. The service's own prefixes (the blob store of
``BLOB_URL`` and the model repository of ``MODELS_DIR``) are refused even under ``*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from batchvision.core.manifest import bucket_problem, key_problem

SCHEME = "s3://"


@dataclass(frozen=True)
class Location:
    """A bucket and a folder prefix in it (empty: the whole bucket; else ending in ``/``)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Location:
        """``s3://bucket[/prefix]`` as a folder; ``ValueError`` naming what is wrong."""
        if not url.startswith(SCHEME):
            raise ValueError(f"{url[:200]!r} is not an s3://bucket[/prefix/] URL")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        problem = bucket_problem(bucket) or key_problem(prefix)
        if problem is not None:
            raise ValueError(f"{problem} in {url[:200]!r}")
        return cls(bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/")

    def holds(self, bucket: str, key: str) -> bool:
        """Whether ``key`` of ``bucket`` (an object, or a prefix that is listed) lies under it."""
        return bucket == self.bucket and key.startswith(self.prefix)

    def overlaps(self, bucket: str, key: str, *, listed: bool) -> bool:
        """Whether ``key`` reaches into this location: it lies under it, or (``listed``: a
        prefix whose every object is read) this location lies under it."""
        if bucket != self.bucket:
            return False
        return key.startswith(self.prefix) or (listed and self.prefix.startswith(key))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Scope:
    """The parsed ``BATCHVISION_S3_ALLOW``, with the service's own locations it never admits."""

    allowed: tuple[Location, ...] = ()
    any_bucket: bool = False
    #: The service's own locations, each with what it is (named in the refusal).
    reserved: tuple[tuple[Location, str], ...] = ()

    @classmethod
    def parse(cls, raw: str, reserved: Mapping[str, str] | None = None) -> S3Scope:
        """``raw``: comma-separated ``*``, ``s3://bucket`` or ``s3://bucket/prefix/`` entries;
        ``reserved``: ``{s3 URL: what it is}`` (URLs that are not ``s3://`` are ignored).
        ``ValueError`` names a bad entry and what is allowed."""
        allowed: list[Location] = []
        any_bucket = False
        for item in (i.strip() for i in raw.split(",")):
            if not item:
                continue
            if item == "*":
                any_bucket = True
                continue
            try:
                allowed.append(Location.parse(item))
            except ValueError as exc:
                raise ValueError(f"{exc}; entries are `*`, `s3://bucket` or `s3://bucket/prefix/`") from None
        own = tuple(
            (Location.parse(url), what) for url, what in (reserved or {}).items() if url.startswith(SCHEME)
        )
        return cls(tuple(allowed), any_bucket, own)

    def __bool__(self) -> bool:
        """Whether jobs may name any bucket at all."""
        return self.any_bucket or bool(self.allowed)

    def problem(self, bucket: str, key: str, *, listed: bool = False) -> str | None:
        """Why a job may not name ``s3://bucket/key`` (``None``: it may). ``listed``: the key
        is a prefix whose objects are all read (a source) or written (an output)."""
        url = f"{SCHEME}{bucket}/{key}"[:200]
        dots = key_problem(key)
        if dots is not None:  # it may resolve outside whatever prefix it starts with
            return f"{url!r}: {dots}"
        for location, what in self.reserved:
            if location.overlaps(bucket, key, listed=listed):
                return f"{url!r} reaches into {what} ({location}), which jobs may not name"
        if self.any_bucket or any(a.holds(bucket, key) for a in self.allowed):
            return None
        if not self.allowed:
            return f"{url!r}: this service lets jobs name no bucket (BATCHVISION_S3_ALLOW is empty)"
        return f"{url!r} is outside BATCHVISION_S3_ALLOW (jobs may name: {', '.join(map(str, self.allowed))})"
