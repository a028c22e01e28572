"""``BATCHVISION_S3_ALLOW``: which ``s3://`` locations a job may name (pure: no store)."""

from __future__ import annotations

import pytest

from batchvision.core.s3_scope import S3Scope
from batchvision.core.settings import Settings, SettingsError

OWN = {"s3://svc/blobs/": "the blob store of BLOB_URL", "s3://models": "the model repository of MODELS_DIR"}


def test_prefixes_are_folders_and_buckets_are_exact() -> None:
    scope = S3Scope.parse("s3://inbox/photos, s3://outbox/, s3://shared-bucket", OWN)
    assert scope.problem("inbox", "photos/a.jpg") is None
    assert scope.problem("inbox", "photos/", listed=True) is None
    assert scope.problem("shared-bucket", "any/key.png") is None
    assert scope.problem("outbox", "run/7/", listed=True) is None
    # `photos` is a folder: a sibling with the same beginning is not under it.
    assert "outside BATCHVISION_S3_ALLOW" in (scope.problem("inbox", "photos-private/a.jpg") or "")
    # Listing a parent of an allowed prefix reads more than it: refused.
    assert scope.problem("inbox", "", listed=True) is not None
    assert scope.problem("inbox", "pho", listed=True) is not None
    assert scope.problem("shared-bucket-2", "x.jpg") is not None
    assert "s3://inbox/photos/, s3://outbox/, s3://shared-bucket/" in (scope.problem("nope", "x") or "")


def test_the_services_own_locations_are_refused_even_under_a_wildcard() -> None:
    scope = S3Scope.parse("*", OWN)
    assert scope.problem("anything", "at/all.jpg") is None
    assert "the blob store of BLOB_URL" in (scope.problem("svc", "blobs/job/0") or "")
    assert scope.problem("svc", "blobsmith/x.jpg") is None  # a neighbour of the prefix
    # A listed parent reaches into it; an object beside it does not.
    assert "the blob store" in (scope.problem("svc", "", listed=True) or "")
    assert scope.problem("svc", "readme.jpg") is None
    assert "the model repository of MODELS_DIR" in (scope.problem("models", "m/1/model.keras") or "")


def test_empty_allows_no_bucket_and_says_so() -> None:
    assert "BATCHVISION_S3_ALLOW is empty" in (S3Scope.parse("").problem("inbox", "a.jpg") or "")


@pytest.mark.parametrize(
    "bad", ["inbox/photos", "s3://Bad_Bucket/x", "s3://", "https://inbox/x", "s3://inbox,*,gs://x"]
)
def test_a_bad_entry_is_a_settings_error_naming_it(bad: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"BATCHVISION_S3_ALLOW": bad})
    assert "BATCHVISION_S3_ALLOW" in str(err.value)
    assert "entries are `*`, `s3://bucket` or `s3://bucket/prefix/`" in str(err.value)


def test_settings_reserve_an_s3_blob_store_and_model_repository() -> None:
    s = Settings.from_env(
        {
            "BATCHVISION_S3_ALLOW": "*",
            "BATCHVISION_BLOB_URL": "s3://svc/up/",
            "BATCHVISION_MODELS_DIR": "s3://svc/m/",
        }
    )
    scope = s.s3_scope()
    assert scope.problem("svc", "up/x") is not None and scope.problem("svc", "m/x") is not None
    assert scope.problem("svc", "in/x") is None
    # A local blob store or model folder reserves nothing in any bucket.
    assert Settings.from_env({"BATCHVISION_S3_ALLOW": "*"}).s3_scope().reserved == ()


@pytest.mark.parametrize(
    "key", ["photos/../secret/a.jpg", "photos/./a.jpg", "photos/..", "photos\\..\\secret\\a.jpg"]
)
def test_a_key_with_a_dot_segment_is_refused_though_it_starts_under_an_allowed_prefix(key: str) -> None:
    # A store or a proxy in front of it may resolve the segment: photos/../secret/ is secret/.
    from batchvision.server.s3 import S3Error, S3Url

    scope = S3Scope.parse("s3://inbox/photos/", OWN)
    assert "'.' or '..' segment" in (scope.problem("inbox", key) or "")
    with pytest.raises(S3Error, match=r"'\.' or '\.\.' segment") as err:
        S3Url.parse(f"s3://inbox/{key}")
    assert err.value.code == "bad_url"
    # Dots inside a name are only dots.
    assert scope.problem("inbox", "photos/a..b/..c.jpg") is None
    assert S3Url.parse("s3://inbox/photos/a..b/..c.jpg").key == "photos/a..b/..c.jpg"
