"""``DeleteObjects`` answers ``200`` even when keys were not deleted: each key's error is in the
reply's ``Errors``, and :meth:`S3.delete` must not take it for a success."""

from __future__ import annotations

import pytest
from botocore.stub import Stubber

from batchvision.server.s3 import S3, S3Config, S3Error, S3Url


def test_delete_raises_on_the_keys_the_store_refused() -> None:
    s3 = S3(S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1))
    urls = [S3Url("bucket", "a"), S3Url("bucket", "b"), S3Url("bucket", "c")]
    objects = {"Objects": [{"Key": k} for k in "abc"], "Quiet": True}
    with Stubber(s3._client) as stub:
        errors = [
            {"Key": "b", "Code": "AccessDenied", "Message": "Access Denied"},
            {"Key": "c", "Code": "AccessDenied", "Message": "Access Denied"},
        ]
        stub.add_response("delete_objects", {"Errors": errors}, {"Bucket": "bucket", "Delete": objects})
        with pytest.raises(S3Error) as caught:
            s3.delete(urls)
        stub.add_response("delete_objects", {}, {"Bucket": "bucket", "Delete": objects})
        s3.delete(urls)  # every key deleted: no error
    assert caught.value.code == "access_denied"
    assert "s3://bucket/b" in caught.value.message and "1 more" in caught.value.message
