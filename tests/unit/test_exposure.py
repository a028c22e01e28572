"""Secure by default: which addresses ``batchvision api`` serves on without API keys."""

from __future__ import annotations

import pytest

from batchvision.cli.main import exposure_check, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.0.0.5", "192.168.1.2", "api.example.com", ""])
def test_everything_else_is_reachable_from_outside(host: str) -> None:
    assert not is_loopback(host)


def test_without_keys_a_public_address_is_refused_and_the_message_says_what_to_set() -> None:
    ok, message = exposure_check("0.0.0.0", 8000, "", anonymous_allowed=False)
    assert not ok
    assert "0.0.0.0:8000" in message
    assert "BATCHVISION_API_KEYS" in message and "BATCHVISION_ALLOW_ANONYMOUS=true" in message
    assert exposure_check("10.1.2.3", 8000, " , ", anonymous_allowed=False)[0] is False  # blank keys


def test_without_keys_loopback_serves_with_a_warning() -> None:
    ok, message = exposure_check("127.0.0.1", 8000, "", anonymous_allowed=False)
    assert ok and "without authentication" in message and "loopback" in message


def test_anonymous_access_on_a_public_address_needs_the_setting_and_is_announced() -> None:
    ok, message = exposure_check("0.0.0.0", 8000, "", anonymous_allowed=True)
    assert ok and "without authentication" in message and "BATCHVISION_ALLOW_ANONYMOUS=true" in message


def test_with_keys_any_address_serves_quietly() -> None:
    assert exposure_check("0.0.0.0", 8000, "k1,k2", anonymous_allowed=False) == (True, "")


def test_host_allow_list() -> None:
    from api.auth import HostAllowList

    loopback = HostAllowList.parse("localhost,127.0.0.1,[::1]")
    for ok in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST."):
        assert loopback.allows(ok), ok
    for bad in (
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "",
        "[::1",
        # The name matches but the "port" is not one: werkzeug would drop the host from links.
        "localhost:1@evil.example",
        "127.0.0.1:x/../evil",
        "[::1]evil",
    ):
        assert not loopback.allows(bad), bad
    pinned = HostAllowList.parse("api.example.com:443,*.corp.example")
    assert pinned.allows("api.example.com:443") and not pinned.allows("api.example.com:80")
    assert pinned.allows("x.corp.example") and not pinned.allows("corp.example.evil")
    assert not HostAllowList.parse(" , ")  # empty: no check
