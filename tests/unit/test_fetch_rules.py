"""The hostile-URL rules of ``batchvision.server.fetch``: the address rules, URL syntax, and the
fetcher against a hostile HTTP server on loopback (in-process threads, an injectable resolver
for names: no DNS, no other process)."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchvision.core.allow_list import AllowList
from batchvision.core.errors import BatchvisionError
from batchvision.core.synthetic import labelled_files
from batchvision.server import webhooks
from batchvision.server.backoff import backoff, retry_after
from batchvision.server.fetch import (
    FETCH_ATTEMPTS,
    FairPool,
    Fetcher,
    SafeHTTP,
    address_problem,
    blob_url,
    parse_url,
    url_blob,
    url_problem,
)
from batchvision.server.watchdog import WATCHDOG

JPEG = next(iter(labelled_files(1, seed=11)))[1]
LOOPBACK = AllowList.parse("127.0.0.1/32")


# -- address rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.6.7", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),  # future use 240/4
        ("255.255.255.255", "reserved"),  # broadcast
        ("192.0.0.8", "reserved"),  # IETF protocol assignments (passed on some Pythons)
        ("192.0.0.170", "reserved"),
        ("192.0.2.1", "reserved"),  # documentation
        ("fec0::1", "site-local"),  # deprecated site-local (taken as public by Python's flags)
        ("feff::1", "site-local"),
        ("3fff::1", "reserved"),  # documentation (2024)
        ("2001:db8::1", "reserved"),
        ("2001::1", "reserved"),  # Teredo, inside the IETF protocol assignments
        ("100::1", "reserved"),  # discard-only, outside global unicast
        ("4000::1", "reserved"),  # unassigned, outside global unicast
        ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64 prefix
        ("100.64.0.1", "non-public"),  # shared address space (carrier-grade NAT)
        ("198.18.0.1", "private"),  # benchmarking
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),  # Azure WireServer: a public address, refused all the same
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::1", "10.0.0.1"),  # 6to4 carrying 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("64:ff9b::7f00:1", "carries 127.0.0.1, a loopback"),  # NAT64: judged by the IPv4 inside
        ("64:ff9b::c000:8", "carries 192.0.0.8, a reserved"),
        ("64:ff9b::a00:1", "carries 10.0.0.1, a private"),
    ],
)
def test_non_public_addresses_are_refused_with_the_reason(address: str, kind: str) -> None:
    problem = address_problem(address)
    assert problem is not None and kind in problem, problem


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: public, as the docs promise
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "192.0.1.1",  # next to 192.0.0.0/24, outside it
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(address) is None


def test_the_allow_list_takes_networks_and_host_names_but_never_metadata() -> None:
    allow = AllowList.parse(" 10.1.0.0/16 , 127.0.0.1, images.internal, *.corp.example, [::1] ")
    assert address_problem("10.1.2.3", allow) is None
    assert address_problem("10.2.0.1", allow) is not None
    assert address_problem("127.0.0.1", allow) is None and address_problem("127.0.0.2", allow) is not None
    assert address_problem("::1", allow) is None
    assert address_problem("::ffff:127.0.0.1", allow) is None  # the same address, mapped
    assert allow.host_allowed("images.internal") and allow.host_allowed("IMAGES.internal.")
    assert allow.host_allowed("a.b.corp.example") and not allow.host_allowed("corp.example.evil")
    assert address_problem("192.168.0.9", allow, trusted=True) is None  # an allow-listed name
    # A Unicode name is kept as URLs carry it (IDNA), so that it matches.
    assert AllowList.parse("bücher.example").host_allowed(parse_url("http://bücher.example/").host)
    everything = AllowList.parse("0.0.0.0/0,::/0")
    assert "metadata" in str(address_problem("169.254.169.254", everything))
    assert "metadata" in str(address_problem("169.254.169.254", allow, trusted=True))


# -- URL syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme 'gopher'"),
        ("ftp://example.com/a.jpg", "scheme 'ftp'"),
        ("//example.com/a.jpg", "scheme '(none)'"),
        ("http://user:pw@example.com/a.jpg", "credentials"),
        ("http://example.com@127.0.0.1/a.jpg", "credentials"),
        ("http:///a.jpg", "without a host"),
        ("http://example.com:99999/", "malformed"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com/a b.jpg", "whitespace"),
        ("http://example.com/a.jpg\r\nX-Injected: 1", "control"),
        ("http://[::1/", "malformed"),
        ("http://example.com/" + "a" * 2100, "longer than"),
    ],
)
def test_bad_urls_are_refused(url: str, says: str) -> None:
    err = url_problem(url)
    assert err is not None and err.code == "bad_url" and says in err.message, err


def test_url_parts_host_header_and_literals() -> None:
    t = parse_url("HTTPS://Example.COM./p/ä.jpg?x=1 2".replace(" ", "%20"))
    assert (t.scheme, t.host, t.port, t.host_header) == ("https", "example.com", 443, "example.com")
    assert t.path == "/p/%C3%A4.jpg?x=1%202"
    assert parse_url("http://[::1]:8080/x").host_header == "[::1]:8080"
    assert parse_url("http://bücher.example/").host == "xn--bcher-kva.example"
    # What the API can tell without the network: literals are checked, names wait for the worker.
    assert url_problem("http://127.0.0.1:9/x.jpg").code == "blocked_address"  # type: ignore[union-attr]
    assert url_problem("http://[::ffff:a9fe:a9fe]/").code == "blocked_address"  # type: ignore[union-attr]
    assert url_problem("http://127.0.0.1:9/x.jpg", LOOPBACK) is None
    assert url_problem("http://2852039166/latest/meta-data/") is None  # a "name": resolved later
    assert url_problem("http://images.example/x.jpg") is None


def test_url_blobs_are_told_apart_from_uploads() -> None:
    assert blob_url(url_blob("http://a.example/x.jpg")) == "http://a.example/x.jpg"
    assert blob_url(JPEG) is None


# -- the fetcher against a hostile server ----------------------------------------------------------


@pytest.fixture(scope="module")
def origin(hostile_origin: Callable[..., Any]) -> Any:
    """The hostile server (``tests/conftest.py``), serving :data:`JPEG`."""
    return hostile_origin([JPEG])


@pytest.fixture()
def server(origin: Any) -> str:
    """Its ``127.0.0.1:<port>``, with no request seen yet."""
    origin.seen.clear()
    return str(origin.address)


def _fetcher(allow: AllowList = LOOPBACK, resolver: Any = None, **kw: Any) -> Fetcher:
    http = SafeHTTP(allow, connect_timeout_s=0.5, resolver=resolver)
    opts: dict[str, Any] = {"max_bytes": 2_000_000, "max_pixels": 4_000_000, "timeout_s": 1.5, **kw}
    return Fetcher(http, **opts)


def _code(fetcher: Fetcher, url: str) -> str:
    try:
        fetcher.fetch(url)
    except BatchvisionError as exc:
        return exc.code
    return "ok"


def test_a_good_image_is_fetched_and_connections_are_reused(server: str) -> None:
    f = _fetcher()
    for _ in range(5):
        assert f.fetch(f"http://{server}/ok.jpg") == JPEG
    pool = next(iter(f.http._pools.values()))
    assert pool.num_connections == 1  # five requests, one kept-alive connection
    f.close()


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/slow?s=3", "fetch_timeout"),  # no headers in time
        ("/drip", "fetch_timeout"),  # a body dripped byte by byte: the total deadline holds
        ("/drip-headers", "fetch_timeout"),  # ... and the headers (each byte resets a read timeout)
        ("/drip-chunked", "fetch_timeout"),  # ... and a chunk-size line
        ("/huge-declared", "too_large"),  # Content-Length over the cap: refused before the body
        ("/huge-stream", "too_large"),  # no length: stopped while streaming, at the cap
        ("/page.jpg", "not_an_image"),  # named .jpg, typed image/jpeg, HTML by content
        ("/truncated.jpg", "truncated"),
        ("/gzip.jpg", "not_an_image"),  # compressed transfer is never decoded
        ("/missing.jpg", "http_404"),
        ("/status/500", "http_500"),
        ("/status/204", "empty_file"),
        ("/loop", "too_many_redirects"),
        ("/redirect?to=file:///etc/passwd", "bad_url"),
        ("/redirect?to=http://169.254.169.254/latest/meta-data/", "blocked_address"),
        ("/redirect?to=http://10.0.0.1/x.jpg", "blocked_address"),
        ("/redirect?to=http://[::1]/x.jpg", "blocked_address"),
        ("/redirect?to=/ok.jpg", "ok"),  # a relative redirect on the same host is fine
        ("/redirect?to=http://127.0.0.1:1/x.jpg", "connection_failed"),  # nothing listens there
    ],
)
def test_hostile_urls_end_with_their_error_code(server: str, path: str, code: str) -> None:
    start = time.monotonic()
    assert _code(_fetcher(), f"http://{server}{path}") == code
    assert time.monotonic() - start < 1.5 + 1.0  # within the deadline (plus slack)
    assert WATCHDOG.watching() == 0  # every connection's guard ended with its fetch


def test_a_connection_handed_back_to_the_pool_outlives_its_last_exchanges_deadline(
    server: str, origin: Any, wait_until: Any
) -> None:
    # Exchange A (1 s) is answered a redirect by the server, hands the connection back to the
    # pool and goes on to a slow second host; exchange B (5 s) takes that connection for a
    # slow answer that outlasts A's deadline. A's deadline must not shut B's connection down
    # (B would see it break, and send its GET again on a new one).
    http = SafeHTTP(LOOPBACK, connect_timeout_s=0.5)
    opts: dict[str, Any] = {"max_bytes": 2_000_000, "max_pixels": 4_000_000}
    a, b = Fetcher(http, timeout_s=1.0, **opts), Fetcher(http, timeout_s=5.0, **opts)
    port = server.split(":")[1]
    outcome: dict[str, str] = {}
    hop = f"http://{server}/redirect?to=http://localhost:{port}/slow%3Fs%3D3"
    first = threading.Thread(target=lambda: outcome.update(a=_code(a, hop)))
    first.start()
    wait_until(lambda: origin.hits("/slow") == 1, timeout=10, message="A on its second host")
    assert _code(b, f"http://{server}/slow?s=1.5") == "ok"
    first.join(10)
    assert outcome["a"] == "fetch_timeout"
    assert origin.hits("/slow") == 2, origin.seen  # A's once and B's once
    http.close()


def test_a_transient_failure_is_tried_again_within_the_deadline(server: str, origin: Any) -> None:
    f = _fetcher()  # a 1.5 s deadline
    assert f.fetch(f"http://{server}/fail/2/503/0.jpg") == JPEG  # two 503s, then the image
    assert origin.hits("/fail/2/503/0.jpg") == 3
    start = time.monotonic()
    assert f.fetch(f"http://{server}/fail/1/429/0.jpg?after=1") == JPEG
    assert time.monotonic() - start >= 1.0  # no sooner than its Retry-After asked
    # Not tried again: a Retry-After past the deadline, an answer about the input itself.
    assert _code(f, f"http://{server}/fail/1/502/0.jpg?after=60") == "http_502"
    assert _code(f, f"http://{server}/fail/1/404/0.jpg") == "http_404"
    assert origin.hits("/fail/1/502/0.jpg") == origin.hits("/fail/1/404/0.jpg") == 1
    # A host that stays down: FETCH_ATTEMPTS tries, the last one's error.
    assert _code(f, f"http://{server}/fail/9/500/0.jpg") == "http_500"
    assert origin.hits("/fail/9/500/0.jpg") == FETCH_ATTEMPTS


def test_without_the_allow_list_loopback_is_refused_before_connecting(server: str, origin: Any) -> None:
    f = _fetcher(AllowList())
    assert _code(f, f"http://{server}/ok.jpg") == "blocked_address"
    assert _code(f, "http://localhost:1/ok.jpg") == "blocked_address"
    assert origin.seen == []


def test_names_are_resolved_once_per_hop_and_every_address_is_checked(server: str, origin: Any) -> None:
    host, port = server.split(":")
    answers = {
        "private.test": ["10.0.0.7"],
        "mixed.test": ["93.184.216.34", "127.0.0.1"],  # one bad address is enough to refuse
        "meta.test": ["169.254.169.254"],
        "loop.test": ["127.0.0.1"],
    }
    asked: list[str] = []

    def resolver(name: str, _port: int) -> list[str]:
        asked.append(name)
        if name not in answers:
            raise OSError("Name or service not known")
        return answers[name]

    f = _fetcher(AllowList(), resolver)
    for name in ("private.test", "mixed.test", "meta.test", "loop.test"):
        assert _code(f, f"http://{name}:{port}/ok.jpg") == "blocked_address"
    # The caller learns the kind of address, not the address: an error row must not map the
    # service's internal names for anyone with a key.
    with pytest.raises(BatchvisionError) as refused:
        f.fetch(f"http://private.test:{port}/ok.jpg")
    assert refused.value.message == "refused: private.test resolves to a private address"
    assert _code(f, f"http://nowhere.test:{port}/ok.jpg") == "dns_error"
    # The redirect's target is resolved and checked too: its name points at a private address.
    assert _code(_fetcher(LOOPBACK, resolver), f"http://{server}/redirect?to=http://private.test/") == (
        "blocked_address"
    )
    # Allowed by address (or by name), the connection goes to the checked address and the name
    # travels as the Host header.
    origin.seen.clear()
    assert _fetcher(LOOPBACK, resolver).fetch(f"http://loop.test:{port}/ok.jpg") == JPEG
    assert _fetcher(AllowList.parse("loop.test"), resolver).fetch(f"http://loop.test:{port}/ok.jpg") == JPEG
    assert origin.seen == [("/ok.jpg", f"loop.test:{port}")] * 2
    assert host == "127.0.0.1"


def test_dns_rebinding_gets_nowhere(server: str, origin: Any) -> None:
    # The name answers a public address to the check, loopback afterwards: the fetcher never
    # asks twice and connects to what it checked (here unreachable), never to the server. (A
    # second try is a new exchange that resolves again: checked again, refused.)
    _, port = server.split(":")
    calls = iter([["192.0.2.1"], ["127.0.0.1"], ["127.0.0.1"]])
    f = _fetcher(AllowList.parse("192.0.2.0/24"), lambda _n, _p: next(calls), timeout_s=1.0, attempts=1)
    assert _code(f, f"http://rebind.test:{port}/ok.jpg") in ("fetch_timeout", "connection_failed")
    assert origin.seen == []
    again = iter([["192.0.2.1"], ["127.0.0.1"], ["127.0.0.1"]])
    f = _fetcher(AllowList.parse("192.0.2.0/24"), lambda _n, _p: next(again), timeout_s=2.0)
    assert _code(f, f"http://rebind.test:{port}/ok.jpg") == "blocked_address"
    assert origin.seen == []


def test_a_key_that_floods_holds_at_most_its_share_of_the_fetch_threads() -> None:
    # One key's fetches hang (a server that never answers); another key's start at once.
    pool = FairPool(threads=4, per_key=2)
    release = threading.Event()
    try:
        hung = [pool.submit("flood", release.wait, 30) for _ in range(50)]
        quick = [pool.submit("small", lambda n: n * 2, n) for n in range(10)]
        assert [f.result(timeout=10) for f in quick] == [n * 2 for n in range(10)]
        assert pool.running("flood") == 2 and not any(f.done() for f in hung)
    finally:
        release.set()
        pool.shutdown()
    assert all(f.result(timeout=10) for f in hung[:2])


def test_without_api_keys_there_is_one_tenant_and_no_per_key_limit(wait_until: Any) -> None:
    pool = FairPool(threads=4, per_key=1)
    release = threading.Event()
    try:
        held = [pool.submit("", release.wait, 30) for _ in range(4)]
        # all four threads, where a key would get one
        wait_until(lambda: pool.running("") == 4, timeout=10, message="four fetches of key ''")
    finally:
        release.set()
        pool.shutdown()
    assert all(f.result(timeout=10) for f in held)


def test_keys_take_turns_for_the_threads(wait_until: Any) -> None:
    pool = FairPool(threads=1, per_key=1)
    gate = threading.Event()
    order: list[str] = []
    try:
        first = pool.submit("a", gate.wait, 10)  # holds the one thread while the queues fill
        wait_until(lambda: pool.running("a") == 1)
        futures = [pool.submit(key, order.append, key) for key in ("a", "a", "a", "b", "b", "c")]
        gate.set()
        first.result(timeout=10)
        for f in futures:
            f.result(timeout=10)
    finally:
        pool.shutdown()
    assert order[:3] == ["a", "b", "c"] and sorted(order) == ["a", "a", "a", "b", "b", "c"]


def test_the_rules_come_from_tables_not_from_this_pythons_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the running Python's ipaddress believes, the verdicts stay the same.
    for flag in ("is_private", "is_reserved", "is_global", "is_link_local", "is_site_local"):
        for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
            monkeypatch.setattr(cls, flag, property(lambda _self: False), raising=False)
    assert address_problem("192.0.0.8") is not None
    assert address_problem("fec0::1") is not None
    assert address_problem("10.0.0.1") is not None
    assert address_problem("8.8.8.8") is None


def test_nat64_is_opened_by_the_allow_list_of_its_ipv4_address() -> None:
    assert address_problem("64:ff9b::7f00:1", LOOPBACK) is None
    assert address_problem("64:ff9b::7f00:2", LOOPBACK) is not None


def test_webhook_signatures_verify_and_reject_tampering() -> None:
    secret = webhooks.signing_secret(b"server-secret", "owner-1")
    assert secret.startswith("whsec_") and secret != webhooks.signing_secret(b"server-secret", "owner-2")
    body = b'{"job_id": "x"}'
    header = webhooks.sign(secret, body, timestamp=1_700_000_000)
    t, v1 = (p.split("=", 1)[1] for p in header.split(","))
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert v1 == expected
    assert webhooks.verify(secret, body, header, now=1_700_000_100)
    assert not webhooks.verify(secret, body + b" ", header, now=1_700_000_100)
    assert not webhooks.verify(secret, body, header, now=1_700_001_000)  # too old: a replay
    assert not webhooks.verify("whsec_other", body, header, now=1_700_000_100)
    assert not webhooks.verify(secret, body, "garbage", now=1_700_000_100)


@pytest.mark.parametrize(
    "header",
    [
        "t=1700000000,v1=\u00e9\u00e9",  # non-ASCII signature: compare_digest would raise TypeError
        "t=1700000000,v1=\u0663",
        "t=\u0661\u0667,v1=ab",  # a non-ASCII digit that int() would take
        "t=1700000000",  # no v1
        "v1=ab",  # no t
        "t=1700000000,v1",  # a field without '='
        "t=soon,v1=ab",
        "",
        None,
        b"t=1700000000,v1=ab",
    ],
)
def test_verify_says_false_to_malformed_headers_and_the_documented_example_too(header: Any) -> None:
    secret = webhooks.signing_secret(b"server-secret", "owner-1")
    assert webhooks.verify(secret, b"{}", header, now=1_700_000_100) is False
    page = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "urls-webhooks.md").read_text()
    snippet = page.split("```python\nimport hashlib, hmac, time\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec("import hashlib, hmac, time\n" + snippet, scope)  # the documented receiver example
    assert scope["verify"](secret, b"{}", header) is False
    good = webhooks.sign(secret, b"{}")
    assert scope["verify"](secret, b"{}", good) is True and webhooks.verify(secret, b"{}", good)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    delays = [
        [backoff(n, webhooks.FIRST_BACKOFF_S, webhooks.MAX_BACKOFF_S) for _ in range(200)]
        for n in (1, 2, 3, 12)
    ]
    assert all(0.5 <= d <= 1.0 for d in delays[0])
    assert all(1.0 <= d <= 2.0 for d in delays[1])
    assert all(2.0 <= d <= 4.0 for d in delays[2])
    assert max(delays[3]) <= webhooks.MAX_BACKOFF_S and len(set(delays[0])) > 100


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_a_webhook_receivers_retry_after_is_read_as_seconds_or_a_date(
    value: str | None, seconds: float | None
) -> None:
    assert retry_after({} if value is None else {"Retry-After": value}) == seconds
    future = email.utils.formatdate(time.time() + 600, usegmt=True)
    assert 595 <= (retry_after({"Retry-After": future}) or 0) <= 600


def test_https_goes_to_the_checked_address_with_the_name_as_sni_and_for_the_certificate(
    tmp_path: Path, hostile_origin: Callable[..., Any]
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=secure.test"]
        + ["-addext", "subjectAltName=DNS:secure.test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sni: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
    port = hostile_origin([JPEG], ssl_context=context).port
    names = {"secure.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    http = SafeHTTP(LOOPBACK, connect_timeout_s=1, resolver=lambda n, _p: names[n], ca_certs=str(cert))
    f = Fetcher(http, max_bytes=2_000_000, max_pixels=4_000_000, timeout_s=3)
    assert f.fetch(f"https://secure.test:{port}/ok.jpg") == JPEG
    assert sni and sni[-1] == "secure.test"
    # The same address under a name the certificate does not carry: refused.
    assert _code(f, f"https://other.test:{port}/ok.jpg") == "tls_error"
    # A certificate no trusted authority signed: refused.
    assert _code(_fetcher(resolver=lambda n, _p: names[n]), f"https://secure.test:{port}/ok.jpg") == (
        "tls_error"
    )


def test_refusals_at_submit_say_what_an_image_url_may_be_and_which_setting_allows_more() -> None:
    from batchvision.core.s3_scope import S3Scope
    from batchvision.server.intake import entry_problem

    scope = S3Scope.parse("")
    private = entry_problem("http://10.0.0.1/a.jpg", AllowList.parse(""), scope)
    assert private is not None and private.code == "blocked_address"
    assert "(unless BATCHVISION_FETCH_ALLOW allows it)" in private.message
    metadata = entry_problem("http://169.254.169.254/latest/", AllowList.parse("169.254.0.0/16"), scope)
    assert metadata is not None and "ALLOW" not in metadata.message  # no allow list opens it
    scheme = entry_problem("ftp://h/a.jpg", AllowList.parse(""), scope)
    assert scheme is not None and "(http and https only)" in scheme.message  # no bucket allowed
    scheme = entry_problem("ftp://h/a.jpg", AllowList.parse(""), S3Scope.parse("s3://inbox/"))
    assert scheme is not None and "(http, https and s3 only)" in scheme.message
    # Elsewhere (a callback, a redirect) s3:// is no choice.
    callback = url_problem("ftp://h/hook", AllowList.parse(""), "BATCHVISION_WEBHOOK_ALLOW")
    assert callback is not None and "(http and https only)" in callback.message
