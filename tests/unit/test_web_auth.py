"""``GET /auth``: how the web page learns whether it needs a key, always with a ``200`` (a 4xx
would be logged by the browser as a failed resource load)."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from api import create_app
from batchvision.core.settings import Settings


def _client(**settings: str) -> FlaskClient:
    # Nothing connects to Redis: /auth reads only the settings.
    return create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0", **settings)).test_client()


def test_without_keys_nothing_is_required() -> None:
    resp = _client().get("/auth")
    assert resp.status_code == 200
    assert resp.get_json() == {"keys_required": False, "key_accepted": True, "reason": None}


@pytest.mark.parametrize(
    ("headers", "accepted", "code"),
    [
        ({}, False, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, False, "invalid_api_key"),
        ({"Authorization": "Bearer k2"}, True, None),
        ({"X-API-Key": "k1"}, True, None),
    ],
)
def test_with_keys_the_answer_says_whether_the_key_is_accepted(
    headers: dict[str, str], accepted: bool, code: str | None
) -> None:
    resp = _client(api_keys="k1,k2").get("/auth", headers=headers)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["keys_required"] is True and body["key_accepted"] is accepted
    assert (body["reason"] or {}).get("code") == code


def test_the_page_asks_auth_and_never_probes_a_job() -> None:
    from api.web import STATIC

    script = (STATIC / "js" / "main.js").read_text()
    assert '"/auth"' in script
    assert "/v1/jobs/${" + '"0"' not in script


def test_request_methods_cannot_grow_the_latency_histogram() -> None:
    from prometheus_client import REGISTRY

    client = _client()
    for i in range(20):
        client.open("/auth", method=f"ZZ{i}")
    client.open("/auth", method="GET")
    methods = {
        sample.labels["method"]
        for family in REGISTRY.collect()
        if family.name == "batchvision_http_request_duration_seconds"
        for sample in family.samples
    }
    assert "GET" in methods and "OTHER" in methods
    assert not {m for m in methods if m.startswith("ZZ")}, methods
