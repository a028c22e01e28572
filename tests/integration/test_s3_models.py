"""A model repository in a bucket (``BATCHVISION_MODELS_DIR=s3://...``) against a real S3 endpoint
(moto in server mode, behind the fault proxy): the local cache's copy (checked, atomic, kept when
a new copy fails, pruned), and a real worker that serves it with versions, the watcher, a broken
upload refused while the live version stays, a copy that fails then heals, and a rollback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.model_mirror import ModelMirror, cache_dir
from batchvision.server.repository import repository, scan
from batchvision.server.s3 import S3, S3Config, S3Url
from batchvision.testing.s3server import MotoServer, S3FaultProxy

ADMIN = "admin-s3-models"


@pytest.fixture(scope="module")
def proxy(s3_server: MotoServer) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.url) as p:
        yield p


def _upload_version(
    s3_server: MotoServer, bucket: str, version: int, model: bytes, labels: bytes, name: str = "shapes"
) -> None:
    client = s3_server.client()
    # The labels first and the model last, as the guide says (S3 has no folder rename).
    client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/labels.txt", Body=labels)
    client.put_object(Bucket=bucket, Key=f"models/{name}/{version}/model.keras", Body=model)


@pytest.fixture(scope="module")
def demo_files(demo_model: Path) -> tuple[bytes, bytes]:
    return demo_model.read_bytes(), demo_model.with_name(demo_model.stem + ".labels.txt").read_bytes()


# -- the cache, in-process ------------------------------------------------------------------------


def test_the_cache_copies_checks_keeps_and_prunes(
    s3_server: MotoServer, s3_bucket: str, proxy: S3FaultProxy, tmp_path: Path
) -> None:
    client = s3_server.client()
    put = client.put_object
    put(Bucket=s3_bucket, Key="models/m/labels.txt", Body=b"a\nb\n")
    put(Bucket=s3_bucket, Key="models/m/1/model.onnx", Body=b"one")
    put(Bucket=s3_bucket, Key="models/m/2/export/saved_model.pb", Body=b"two")
    put(Bucket=s3_bucket, Key="models/m/.3.tmp/model.onnx", Body=b"not a version")
    put(Bucket=s3_bucket, Key="models/m/1/../../../escape", Body=b"never written")
    put(Bucket=s3_bucket, Key="models/notes.txt", Body=b"beside the models")
    s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=2))
    mirror = ModelMirror(S3Url.parse(f"s3://{s3_bucket}/models"), tmp_path / "cache", s3)

    assert mirror.sync() == {}
    root = tmp_path / "cache"
    assert (root / "m" / "1" / "model.onnx").read_bytes() == b"one"
    assert (root / "m" / "2" / "export" / "saved_model.pb").read_bytes() == b"two"
    assert (root / "m" / "labels.txt").read_bytes() == b"a\nb\n"
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1", "2", "labels.txt"]
    assert not (tmp_path / "escape").exists() and not (root / "escape").exists()
    entry = scan(root)["m"]
    assert sorted(entry.versions) == [1, 2]
    listed = {o.key: o for o in s3.list(S3Url(s3_bucket, "models/m/1/"))}
    assert entry.versions[1].mtime == pytest.approx(listed["models/m/1/model.onnx"].modified, abs=1)

    # Unchanged: nothing is read again (every GET would be refused).
    denied = f"/{s3_bucket}/models/m/"
    proxy.fail("GET", denied, 403, "AccessDenied")
    try:
        assert mirror.sync() == {}
        assert proxy.hits.get(("GET", denied), 0) == 0
        # Version 1 changed, version 3 new, and neither can be read: 1 keeps its earlier copy,
        # 3 is refused with the S3 code, and nothing half-copied is left.
        put(Bucket=s3_bucket, Key="models/m/1/model.onnx", Body=b"one, again")
        put(Bucket=s3_bucket, Key="models/m/3/model.onnx", Body=b"three")
        problems = mirror.sync()
    finally:
        proxy.clear()
    assert list(problems) == ["m"] and list(problems["m"]) == [3]
    assert "access_denied" in problems["m"][3]
    assert (root / "m" / "1" / "model.onnx").read_bytes() == b"one"
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1", "2", "labels.txt"]

    # The store answers again: both are copied; then version 2 and the model's labels go.
    assert mirror.sync() == {}
    assert (root / "m" / "1" / "model.onnx").read_bytes() == b"one, again"
    assert (root / "m" / "3" / "model.onnx").read_bytes() == b"three"
    client.delete_objects(
        Bucket=s3_bucket,
        Delete={"Objects": [{"Key": "models/m/2/export/saved_model.pb"}, {"Key": "models/m/labels.txt"}]},
    )
    assert mirror.sync() == {}
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1", "3"]
    client.delete_objects(
        Bucket=s3_bucket,
        Delete={"Objects": [{"Key": f"models/m/{v}/model.onnx"} for v in (1, 3)]},
    )
    assert mirror.sync() == {} and not (root / "m").exists()


def test_a_sync_of_some_models_leaves_the_others_in_the_shared_cache(
    s3_server: MotoServer, s3_bucket: str, proxy: S3FaultProxy, tmp_path: Path
) -> None:
    # Workers with different WORKER_MODELS share one cache: one that serves only "a" must not
    # remove the "b" another worker copied, but does remove its own model once it is gone.
    put = s3_server.client().put_object
    put(Bucket=s3_bucket, Key="models/a/1/model.onnx", Body=b"a one")
    put(Bucket=s3_bucket, Key="models/b/1/model.onnx", Body=b"b one")
    s3 = S3(S3Config(endpoint_url=proxy.url, max_attempts=2))
    root = tmp_path / "cache"
    mirror = ModelMirror(S3Url.parse(f"s3://{s3_bucket}/models"), root, s3)
    assert mirror.sync(only={"b"}) == {}
    assert mirror.sync(only={"a"}) == {}
    assert (root / "a" / "1" / "model.onnx").read_bytes() == b"a one"
    assert (root / "b" / "1" / "model.onnx").read_bytes() == b"b one"
    s3_server.client().delete_object(Bucket=s3_bucket, Key="models/a/1/model.onnx")
    assert mirror.sync(only={"a"}) == {}
    assert not (root / "a").exists()
    assert (root / "b" / "1" / "model.onnx").read_bytes() == b"b one"


def test_the_repository_reads_a_bucket_and_names_what_it_cannot_read(
    s3_server: MotoServer, s3_bucket: str, demo_files: tuple[bytes, bytes], tmp_path: Path
) -> None:
    model, labels = demo_files
    _upload_version(s3_server, s3_bucket, 1, model, labels)
    _upload_version(s3_server, s3_bucket, 1, model, labels, name="other")
    settings = Settings(
        models_dir=f"s3://{s3_bucket}/models/",
        models_cache_dir=str(tmp_path),
        model="shapes",
        s3_endpoint_url=s3_server.url,
        worker_models="shapes",
    )
    # Version 2: its labels there, its model file not yet.
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/shapes/2/labels.txt", Body=labels)
    entries = repository(settings)
    assert list(entries) == ["shapes"], "only the models the worker serves are copied"
    assert entries["shapes"].versions[1].source == str(cache_dir(settings) / "shapes" / "1" / "model.keras")
    # Its refusal names the bucket's location, not the worker's local copy.
    why = entries["shapes"].problems[2]
    assert f"s3://{s3_bucket}/models/shapes/2" in why and str(tmp_path) not in why, why
    missing = settings.replace(models_dir="s3://no-such-bucket-here/models/")
    with pytest.raises(ValueError, match="no-such-bucket-here.*the bucket does not exist"):
        repository(missing)


# -- a real worker ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_bucket(s3_server: MotoServer, demo_files: tuple[bytes, bytes]) -> str:
    name = f"models-{os.urandom(4).hex()}"
    s3_server.client().create_bucket(Bucket=name)
    _upload_version(s3_server, name, 1, *demo_files)
    return name


@pytest.fixture(scope="module")
def models_stack(
    start_private_stack: Any,
    proxy: S3FaultProxy,
    model_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
    wait_until: Callable[..., Any],
) -> Any:
    stack = start_private_stack(
        "s3-models",
        models_dir=f"s3://{model_bucket}/models/",
        models_cache_dir=str(tmp_path_factory.mktemp("models-cache")),
        model="shapes",
        model_poll_s=0.5,
        admin_keys=ADMIN,
        s3_endpoint_url=proxy.url,
        s3_max_attempts=2,
    )
    stack.worker()
    wait_until(lambda: _shapes(stack)["workers"] == 1, timeout=60, message="the worker announces shapes")
    return stack


def _shapes(stack: Any) -> dict[str, Any]:
    models = requests.get(f"{stack.url}/v1/models", timeout=10).json()["models"]
    return next((m for m in models if m["name"] == "shapes"), {"workers": 0, "versions": []})


def _versions(stack: Any) -> dict[int, dict[str, Any]]:
    return {v["version"]: v for v in _shapes(stack)["versions"]}


def _classify(stack: Any, files: list[tuple[str, bytes]]) -> list[Any]:
    job = stack.client.submit_files(files)
    stack.client.wait(job.job_id, timeout=180, poll_s=0.2)
    return list(stack.client.results(job.job_id))


def test_a_worker_serves_a_bucket_repository_with_versions_watcher_and_rollback(
    models_stack: Any,
    s3_server: MotoServer,
    model_bucket: str,
    proxy: S3FaultProxy,
    demo_model: Path,
    demo_files: tuple[bytes, bytes],
    reference_labels: Any,
    wait_until: Callable[..., Any],
) -> None:
    files = [(name, data) for name, data, _ in labelled_files(6, seed=31)]
    expected = reference_labels(demo_model, files)
    rows = _classify(models_stack, files)
    assert [r.label for r in rows] == expected and {r.version for r in rows} == {1}

    # A new version in the bucket: the watcher copies it, loads it and switches.
    _upload_version(s3_server, model_bucket, 2, *demo_files)
    wait_until(lambda: _shapes(models_stack)["live_version"] == 2, timeout=90, message="version 2 live")
    rows = _classify(models_stack, files)
    assert [r.label for r in rows] == expected and {r.version for r in rows} == {2}

    # A broken upload is refused with the reason; version 2 stays live.
    _upload_version(s3_server, model_bucket, 3, b"this is not a Keras file", demo_files[1])
    wait_until(
        lambda: _versions(models_stack).get(3, {}).get("status") == "failed",
        timeout=60,
        message="version 3 refused",
    )
    assert _shapes(models_stack)["live_version"] == 2

    # A version whose copy fails (the store throttles every read of it) is refused with the S3
    # code while it does; once the store serves it, the next look copies it and it goes live.
    proxy.fail("GET", f"/{model_bucket}/models/shapes/4/", 503, "SlowDown")
    try:
        _upload_version(s3_server, model_bucket, 4, *demo_files)
        wait_until(
            lambda: "s3_throttled" in (_versions(models_stack).get(4, {}).get("error") or ""),
            timeout=60,
            message="version 4's copy refused",
        )
        assert _shapes(models_stack)["live_version"] == 2
    finally:
        proxy.clear()
    wait_until(lambda: _shapes(models_stack)["live_version"] == 4, timeout=90, message="version 4 live")
    assert _versions(models_stack)[4]["status"] == "ready"

    # Rollback to version 1 through the API.
    resp = requests.post(
        f"{models_stack.url}/v1/models/shapes/reload",
        json={"version": 1},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert resp.status_code == 202, resp.text
    wait_until(lambda: _shapes(models_stack)["live_version"] == 1, timeout=60, message="rolled back to 1")
    rows = _classify(models_stack, files)
    assert [r.label for r in rows] == expected and {r.version for r in rows} == {1}

    # A version deleted from the bucket is forgotten (the cache drops its copy).
    s3_server.client().delete_objects(
        Bucket=model_bucket,
        Delete={"Objects": [{"Key": f"models/shapes/3/{f}"} for f in ("labels.txt", "model.keras")]},
    )
    wait_until(lambda: 3 not in _versions(models_stack), timeout=60, message="version 3 forgotten")
    cache = Path(models_stack.settings.models_cache_dir)
    assert not any(p.name == "3" for p in cache.glob("*/shapes/*")), "the cache dropped version 3"
    assert sorted(p.name for p in cache.glob("*/shapes/*")) == ["1", "2", "4"]
