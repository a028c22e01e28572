"""The ``s3`` compose profile's object store: moto's S3 server on 0.0.0.0:9000 with the buckets
named in ``S3_BUCKETS`` (comma-separated) created at start."""

from __future__ import annotations

import os
import signal
import threading

import boto3
from moto.server import ThreadedMotoServer

PORT = int(os.environ.get("S3_PORT", "9000"))


def main() -> None:
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT)  # noqa: S104 - the compose network's
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{PORT}",
        region_name="us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or "local",
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or "local",
    )
    for bucket in filter(None, (b.strip() for b in os.environ.get("S3_BUCKETS", "").split(","))):
        client.create_bucket(Bucket=bucket)
        print(f"bucket {bucket} created", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
