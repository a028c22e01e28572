"""Settings are validated when they are built: a bad value names the variable, the value and
what is allowed; secrets never show in repr or in a child's environment unless asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchvision.core.settings import Settings, SettingsError, unknown_variables


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BATCHVISION_RESULT_TTL_S", "-5", "greater than or equal to 1"),
        ("BATCHVISION_MAX_QUEUED_IMAGES", "-1", "greater than or equal to 0"),
        ("BATCHVISION_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("BATCHVISION_TOP_K", "many", "valid integer"),
        ("BATCHVISION_PREPROCESS", "imagenet", "'auto', 'none', 'tf', 'caffe', 'torch' or 'unit'"),
        ("BATCHVISION_LOG_FORMAT", "xml", "'text' or 'json'"),
        ("BATCHVISION_REDIS_URL", "http://redis:6379", "redis://, rediss:// or unix://"),
        ("BATCHVISION_BLOB_URL", "gs://bucket", "s3://bucket/prefix/"),
        ("BATCHVISION_BLOB_URL", "s3://My_Bucket/blobs/", "not a valid bucket name: 'My_Bucket'"),
        ("BATCHVISION_API_PORT", "70000", "less than or equal to 65535"),
        ("BATCHVISION_SYNC_TIMEOUT_S", "nan", "finite number"),
        # Redis refused the expiry of every job ("invalid expire time"): each submit was a 500.
        ("BATCHVISION_RESULT_TTL_S", "10000000000000000", "less than or equal to 315360000"),
        ("BATCHVISION_MAX_COMPRESSION_RATIO", "inf", "finite number"),  # no zip-bomb guard at all
        ("BATCHVISION_S3_ENDPOINT_URL", "minio:9000", "http:// or https:// URL"),
        ("BATCHVISION_OUTPUT_PART_ROWS", "1000000", "less than or equal to 100000"),
        ("BATCHVISION_QUEUE", "has space", "pattern"),
        ("BATCHVISION_MAX_COMPRESSION_RATIO", "1", "greater than 1"),
        # An entry that could never match would silently refuse every fetch as blocked_address.
        ("BATCHVISION_FETCH_ALLOW", "10.0.0.0/33", "entry '10.0.0.0/33' is neither a network"),
        ("BATCHVISION_FETCH_ALLOW", "images.internal,http://cdn.internal", "'http://cdn.internal'"),
        ("BATCHVISION_WEBHOOK_ALLOW", "hooks.internal:8080", "nor a host name"),
        ("BATCHVISION_WEBHOOK_ALLOW", "*", "entry '*'"),
        ("BATCHVISION_FORWARDED_ALLOW_IPS", "10.0.0.1,ingress", "'ingress' is not an IP address or network"),
        ("BATCHVISION_FORWARDED_ALLOW_IPS", "*,10.0.0.1", "`*` alone"),
        ("BATCHVISION_FORWARDED_ALLOW_IPS", "10.0.0.5/8", "has host bits set"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_is_allowed(variable: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert f"{variable}={value!r}" in message and says in message, message


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BATCHVISION_TOP_K": "0", "BATCHVISION_API_WORKERS": "0"})
    assert "BATCHVISION_TOP_K" in str(info.value) and "BATCHVISION_API_WORKERS" in str(info.value)


def test_overrides_and_replace_are_validated_too() -> None:
    with pytest.raises(SettingsError, match="BATCHVISION_CHUNK_SIZE"):
        Settings.from_env({}, chunk_size=0)
    with pytest.raises(SettingsError, match="BATCHVISION_WORKER_THREADS"):
        Settings.from_env({}).replace(worker_threads=-1)


def test_secrets_are_masked_and_left_out_of_a_childs_environment_unless_asked() -> None:
    s = Settings.from_env(
        {"BATCHVISION_API_KEYS": "k-123", "BATCHVISION_FLOWER_PASSWORD": "pw-456"},
        redis_url="redis://:rpw-789@redis:6379/0",
    )
    shown = repr(s) + str(s)
    assert "k-123" not in shown and "pw-456" not in shown and "rpw-789" not in shown
    assert s.api_keys.get_secret_value() == "k-123"
    env = s.to_env()
    assert "BATCHVISION_API_KEYS" not in env and "BATCHVISION_FLOWER_PASSWORD" not in env
    full = s.to_env(include_secrets=True)
    assert full["BATCHVISION_API_KEYS"] == "k-123" and full["BATCHVISION_FLOWER_PASSWORD"] == "pw-456"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BATCHVISION_API_KEYS": "k-123", "BATCHVISION_TOP_K": "0"})
    assert "k-123" not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BATCHVISION_REDIS_URL", "http://:TOPSECRET@h:6379"),
        ("BATCHVISION_BROKER_URL", "amqp://u:TOPSECRET@"),
        ("BATCHVISION_S3_ENDPOINT_URL", "ftp://admin:TOPSECRET@minio:9000"),
    ],
)
def test_a_refused_url_is_shown_without_its_password(variable: str, value: str) -> None:
    # The error goes to the service's log: a typo in the scheme must not put the password there.
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value) and "TOPSECRET" not in str(info.value), str(info.value)
    assert "**********" in str(info.value)


def test_unknown_variables_are_found_and_client_variables_are_known() -> None:
    env = {"BATCHVISION_TOPK": "3", "BATCHVISION_API_URL": "http://x", "BATCHVISION_TOP_K": "3", "PATH": "/"}
    assert unknown_variables(env) == ["BATCHVISION_TOPK"]


def test_a_service_refuses_to_start_with_a_bad_setting_and_says_why() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "worker"],
        env={"BATCHVISION_RESULT_TTL_S": "-5", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "BATCHVISION_RESULT_TTL_S='-5'" in proc.stderr and "Traceback" not in proc.stderr


def test_queue_quotas_have_ranges_and_a_key_quota_stays_within_the_whole_queue() -> None:
    with pytest.raises(SettingsError, match=r"BATCHVISION_QUEUED_BYTES_SHARE='0.95'"):
        Settings.from_env({"BATCHVISION_QUEUED_BYTES_SHARE": "0.95"})
    with pytest.raises(SettingsError, match=r"BATCHVISION_MAX_QUEUED_BYTES_PER_KEY='-1'"):
        Settings.from_env({"BATCHVISION_MAX_QUEUED_BYTES_PER_KEY": "-1"})
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"BATCHVISION_MAX_QUEUED_BYTES": "1000", "BATCHVISION_MAX_QUEUED_BYTES_PER_KEY": "2000"}
        )
    assert "BATCHVISION_MAX_QUEUED_BYTES_PER_KEY (2000) is above BATCHVISION_MAX_QUEUED_BYTES (1000)" in str(
        info.value
    )
    assert "BATCHVISION_?" not in str(info.value)
    fine = Settings.from_env({"BATCHVISION_MAX_QUEUED_IMAGES_PER_KEY": "50"})  # no global limit: any quota
    assert fine.max_queued_images_per_key == 50 and fine.max_queued_bytes == 0


def test_the_settings_command_checks_and_prints_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchvision.cli.main import main

    for name in [k for k in __import__("os").environ if k.startswith("BATCHVISION_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BATCHVISION_TOP_K", "3")
    monkeypatch.setenv("BATCHVISION_REDIS_URL", "redis://:rpw-789@redis:6379/0")
    monkeypatch.setenv("BATCHVISION_API_KEYS", "k-123")
    monkeypatch.setenv("BATCHVISION_TOPK", "2")  # a typo
    assert main(["settings", "--changed"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "* BATCHVISION_REDIS_URL=redis://:**********@redis:6379/0",
        "* BATCHVISION_TOP_K=3",
        "* BATCHVISION_API_KEYS=**********",
    ]
    assert "BATCHVISION_TOPK: unknown setting" in err
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "  BATCHVISION_MAX_BATCH_SIZE=32\n" in out and "* BATCHVISION_TOP_K=3\n" in out
    monkeypatch.setenv("BATCHVISION_TOP_K", "0")
    assert main(["settings"]) == 2
    assert "BATCHVISION_TOP_K='0'" in capsys.readouterr().err
