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
