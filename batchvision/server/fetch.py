"""Fetching what users name by URL: image URLs (workers) and webhook receivers (deliverer).

Every URL here is hostile input. The rules, each enforced on every hop:

- ``http`` and ``https`` only, no credentials in the URL, at most
  :data:`~batchvision.core.manifest.MAX_URL_LENGTH` characters (``bad_url``);
- the host is resolved here, and **every** address it resolves to must pass the address rules
  (:func:`address_problem`: loopback, private, link-local, site-local, multicast, reserved,
  unspecified, shared and other non-global ranges from the explicit tables :data:`IPV4_TABLE`
  and :data:`IPV6_TABLE`; IPv4-mapped, NAT64 and 6to4 forms judged by the IPv4 address they
  carry; cloud metadata addresses: ``blocked_address``) unless the allow-list lists the host or
  the address: ``BATCHVISION_FETCH_ALLOW`` for image URLs, ``BATCHVISION_WEBHOOK_ALLOW`` for
  callbacks (metadata addresses stay refused whatever they say);
- the connection is opened **to the checked address**, never to the name again (a name that
  answers a public address to the check and a private one to the connection, DNS rebinding,
  gets nowhere); the name is sent as ``Host`` and as TLS SNI, and the certificate is verified
  against the name;
- redirects are followed by hand, at most ``FETCH_MAX_REDIRECTS``, each one parsed, resolved
  and checked like the first URL (``too_many_redirects``, ``blocked_address``, ``bad_url``);
- one deadline covers resolution, connections, redirects and the body (``fetch_timeout``),
  connecting has its own shorter limit; the body is read in pieces and the download stops the
  moment it passes the byte cap (``too_large``; a ``Content-Length`` over the cap stops it
  before any byte); the first bytes must look like an image, and the whole body then passes
  the same header checks as an upload (``not_an_image``, ``truncated``, ``too_many_pixels``...);
- anything but 2xx (after redirects) is ``http_<status>``; refused or reset connections are
  ``connection_failed``, certificate problems ``tls_error``, names that do not resolve
  ``dns_error``. No proxy from the environment is used, and content is asked for and read
  without transfer compression (no decompression bombs).

Fairness: :class:`FairPool` runs the fetches of many API keys on a fixed set of threads, at
most ``FETCH_PER_KEY`` of one key at a time.

Connection reuse: one urllib3 pool per (scheme, host, port, checked address), kept across
fetches, so the images of one host reuse keep-alive connections (and TLS sessions) as long as
the host keeps resolving to the same address; a new address gets its own, checked, pool.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from batchvision import __version__
from batchvision.core.allow_list import NOTHING, AllowList, IPAddress
from batchvision.core.errors import BatchvisionError
from batchvision.core.imaging import DEFAULT_MAX_FRAMES, inspect_image
from batchvision.core.manifest import MAX_URL_LENGTH
from batchvision.core.results import retryable
from batchvision.core.settings import Settings
from batchvision.core.sniff import looks_like_image
from batchvision.server.backoff import backoff, retry_after
from batchvision.server.watchdog import WATCHDOG, Watchdog

#: ``(host, port) -> addresses``; the default asks the system (``getaddrinfo``).
Resolver = Callable[[str, int], list[str]]

log = logging.getLogger(__name__)

USER_AGENT = f"batchvision/{__version__} (+fetch)"
#: Cloud instance-metadata endpoints: refused even when the allow-list covers them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Tries of one image URL, within its deadline, when it fails for a transient reason.
FETCH_ATTEMPTS = 3
#: The backoff between them: from a fifth of a second, doubling, at most two seconds.
RETRY_FIRST_S = 0.2
RETRY_CAP_S = 2.0
_PIECE = 64 * 1024


class FetchError(BatchvisionError):
    """A URL that could not be fetched; ``code`` says why (the per-image error code);
    ``retry_after``: the seconds the server's ``Retry-After`` asked for, if it sent one."""

    status = 422
    code = "fetch_failed"
    retry_after: float | None = None


# -- the rules (pure) -------------------------------------------------------------------------


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]:
    return tuple((ipaddress.ip_network(net), kind) for net, kind in pairs)


#: IPv4 ranges that are not public unicast, from the IANA special-purpose address registry
#: (RFC 6890 and its updates), written out here rather than taken from the running Python's
#: ``ipaddress`` flags, which differ between versions (192.0.0.8 passed on some). First match.
IPV4_TABLE = _nets(
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "reserved"),  # "this network"
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "non-public"),  # shared address space (carrier-grade NAT)
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments (192.0.0.8 among them)
    ("192.0.2.0/24", "reserved"),  # documentation
    ("192.88.99.0/24", "reserved"),  # former 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "private"),  # benchmarking
    ("198.51.100.0/24", "reserved"),  # documentation
    ("203.0.113.0/24", "reserved"),  # documentation
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # future use, and the broadcast address
)
#: IPv6: only global unicast (2000::/3) may be public at all; inside it, these ranges are not.
#: NAT64 (64:ff9b::/96), IPv4-mapped and 6to4 addresses are judged by the IPv4 address they
#: carry (see :func:`_embedded_v4`), outside this table.
IPV6_TABLE = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),  # deprecated by RFC 3879, still routed inside some networks
    ("fc00::/7", "private"),  # unique local
    ("ff00::/8", "multicast"),
    ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, ORCHID, benchmarking...)
    ("2001:db8::/32", "reserved"),  # documentation
    ("3fff::/20", "reserved"),  # documentation (2024)
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64 well-known prefix, 6to4), if any;
    such an address is judged by the IPv4 one alone."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


def _kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (``None`` if it is), from the tables above."""
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST:
        for net, kind in IPV6_TABLE:
            if ip in net:
                return kind
        return "reserved"  # outside global unicast: unassigned or special
    table = IPV4_TABLE if ip.version == 4 else IPV6_TABLE
    for net, kind in table:
        if ip.version == net.version and ip in net:
            return kind
    return None


#: What :func:`address_problem` calls an address no allow list opens.
METADATA_KIND = "cloud metadata address"


def address_problem(ip: IPAddress | str, allow: AllowList = NOTHING, *, trusted: bool = False) -> str | None:
    """Why a connection to ``ip`` is refused, or ``None`` when it may be made. ``trusted``: the
    host name is on the allow-list (only metadata addresses are refused then)."""
    refusal = address_refusal(ip, allow, trusted=trusted)
    return refusal[0] if refusal is not None else None


def address_refusal(
    ip: IPAddress | str, allow: AllowList = NOTHING, *, trusted: bool = False
) -> tuple[str, str] | None:
    """:func:`address_problem` as ``(why, kind of address)``, ``None`` when it may be made."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%")[0])
    inner = _embedded_v4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
        ip, inner = ip.ipv4_mapped, None
    for candidate in (ip, inner):
        if candidate in METADATA_ADDRESSES:
            return f"{candidate} is a {METADATA_KIND}", METADATA_KIND
    if trusted or allow.address_allowed(ip):
        return None
    if inner is not None:
        if allow.address_allowed(inner):
            return None
        kind = _kind(inner)
        return (f"{ip} carries {inner}, a {kind} address", f"{kind} address") if kind is not None else None
    kind = _kind(ip)
    if kind is not None:
        return f"{ip} is a {kind} address", f"{kind} address"
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL, split for a request."""

    url: str
    scheme: str
    host: str  # lowercase, IDNA-encoded, no brackets
    port: int
    path: str  # path and query, percent-encoded

    @property
    def literal(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str, schemes: str = "http and https") -> Target:
    """Split ``url`` or raise ``FetchError(bad_url)``: http(s), a host, no credentials, no
    control characters or whitespace, a valid port, at most MAX_URL_LENGTH characters.
    ``schemes``: what a refusal of the scheme says is allowed where the URL came from."""

    def bad(why: str) -> FetchError:
        return FetchError(f"{why}: {url[:200]!r}", code="bad_url")

    if not isinstance(url, str) or not url:
        raise bad("empty URL")
    if len(url) > MAX_URL_LENGTH:
        raise bad(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise bad("URL with whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise bad(f"malformed URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad(f"scheme {scheme or '(none)'!r} is not allowed ({schemes} only)")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise bad("URL with credentials")
    if not host:
        raise bad("URL without a host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise bad("host name that is not valid IDNA") from exc
    if port == 0:
        raise bad("port 0")
    path = parts.path or "/"
    path = quote(path, safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return Target(url, scheme, host.lower().rstrip("."), port or (443 if scheme == "https" else 80), path)


def url_problem(
    url: str, allow: AllowList = NOTHING, setting: str = "", schemes: str = "http and https"
) -> FetchError | None:
    """What the API can tell about ``url`` without the network: its syntax, and the address
    rules when the host is an address literal (names are resolved and checked when fetched).
    ``setting``: the allow list's variable, named in a refusal (what an operator would change);
    ``schemes``: as :func:`parse_url`."""
    try:
        target = parse_url(url, schemes)
    except FetchError as exc:
        return exc
    ip = target.literal
    if ip is None:
        return None
    problem = address_problem(ip, allow, trusted=allow.host_allowed(target.host))
    if not problem:
        return None
    hint = f" (unless {setting} allows it)" if setting and METADATA_KIND not in problem else ""
    return FetchError(f"refused: {problem}{hint}", code="blocked_address")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the system's order of preference."""
    out: list[str] = []
    for *_, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(addr[0])
        if ip not in out:
            out.append(ip)
    return out


# -- connections to checked addresses ----------------------------------------------------------


class Deadline:
    """One time budget for a whole exchange (redirects included).

    Used as a context manager, it also holds: every connection the exchange uses is shut down
    when the budget is spent (:mod:`~batchvision.server.watchdog`), whatever it is blocked on,
    until it goes back to the pool (where another exchange may take it); leaving the block
    forgets the watches left (of connections closed on the way)."""

    def __init__(self, seconds: float, watchdog: Watchdog = WATCHDOG) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self._watchdog = watchdog
        self._tickets: list[int] = []

    def remaining(self) -> float:
        """Seconds left, 0 once spent."""
        return max(0.0, self.end - time.monotonic())

    def left(self) -> float:
        """Seconds left; ``fetch_timeout`` once spent."""
        left = self.remaining()
        if left <= 0:
            raise FetchError(f"no answer within {self.seconds:g}s", code="fetch_timeout")
        return left

    def guard(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the end of the budget (unless it goes back to the pool first)."""
        self._tickets.append(self._watchdog.watch(sock, self.end))

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        for ticket in self._tickets:
            self._watchdog.cancel(ticket)
        self._tickets.clear()


_current = threading.local()  # the Deadline of the exchange this thread is opening


def _guard(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        try:
            deadline.guard(sock)
        except OSError:
            pass  # closed already: nothing left to bound


class _GuardedConnection:
    """A connection guarded from its first byte by the opening exchange's deadline, and no
    longer watched once closed (the watch's own descriptor would keep it open)."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        _guard(sock)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            WATCHDOG.forget(self.sock)
        super().close()  # type: ignore[misc]


class _GuardedHTTPConnection(_GuardedConnection, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
    pass


class _Guarded:
    """A pool whose connections, new or kept alive, are guarded by the opening exchange's
    deadline."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        _guard(conn.sock)  # a kept-alive one (a new one is guarded as it connects)
        return conn

    def _put_conn(self, conn: Any) -> None:
        # Back in the pool, it is no longer the exchange's: another may take it at once.
        if conn is not None and conn.sock is not None:
            WATCHDOG.forget(conn.sock)
        super()._put_conn(conn)  # type: ignore[misc]


class _GuardedHTTPPool(_Guarded, urllib3.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_Guarded, urllib3.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class SafeHTTP:
    """HTTP(S) to checked addresses only, with pooled keep-alive connections.

    Thread-safe; one per process (``FETCH_THREADS`` fetches and the webhook deliverer share it).
    """

    def __init__(
        self,
        allow: AllowList = NOTHING,
        *,
        connect_timeout_s: float = 5.0,
        resolver: Resolver | None = None,
        per_host: int = 16,
        max_pools: int = 256,
        ca_certs: str | None = None,
    ) -> None:
        self.allow = allow
        self.connect_timeout_s = connect_timeout_s
        self.resolver = resolver or system_resolver
        self.per_host = per_host
        self.max_pools = max_pools
        self.ca_certs = ca_certs
        self._pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()
        # getaddrinfo cannot be interrupted: it runs here, so a hung resolver costs a thread of
        # this bounded pool and a fetch_timeout, never a stuck task.
        self._dns = ThreadPoolExecutor(8, thread_name_prefix="resolve")

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    def address(self, target: Target, deadline: Deadline) -> str:
        """The checked address to connect to for ``target`` (every resolved one must pass)."""
        literal = target.literal
        if literal is not None:
            ips = [str(literal)]
        else:
            future = self._dns.submit(self.resolver, target.host, target.port)
            try:
                ips = future.result(timeout=deadline.left())
            except FutureTimeout as exc:
                raise FetchError(f"resolving {target.host} took too long", code="fetch_timeout") from exc
            except (OSError, UnicodeError) as exc:
                raise FetchError(f"{target.host} does not resolve: {exc}", code="dns_error") from exc
            if not ips:
                raise FetchError(f"{target.host} does not resolve", code="dns_error")
        trusted = self.allow.host_allowed(target.host)
        for ip in ips:
            refusal = address_refusal(ip, self.allow, trusted=trusted)
            if refusal is None:
                continue
            problem, kind = refusal
            if literal is not None:
                raise FetchError(f"refused: {problem}", code="blocked_address")
            # The address a name resolves to is the operator's to see, not the job's caller's:
            # the error row would map the service's internal names for anyone with a key.
            log.warning("refused to fetch from %s: it resolves to %s; %s", target.host, ip, problem)
            raise FetchError(f"refused: {target.host} resolves to a {kind}", code="blocked_address")
        return ips[0]

    def _pool(self, target: Target, ip: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, target.host, target.port, ip)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            common: dict[str, Any] = {"maxsize": self.per_host, "block": False, "retries": False}
            if target.scheme == "https":
                name = None if target.literal is not None else target.host
                pool = _GuardedHTTPSPool(
                    ip,
                    target.port,
                    cert_reqs="CERT_REQUIRED",
                    ca_certs=self.ca_certs or _default_ca(),
                    server_hostname=name,
                    assert_hostname=target.host,
                    **common,
                )
            else:
                pool = _GuardedHTTPPool(ip, target.port, **common)
            self._pools[key] = pool
            while len(self._pools) > self.max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def open(
        self,
        method: str,
        target: Target,
        deadline: Deadline,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request to ``target``'s checked address; the response body is unread.
        Raises :class:`FetchError` (``blocked_address``, ``fetch_timeout``, ...)."""
        ip = self.address(target, deadline)
        pool = self._pool(target, ip)
        sent = {
            "Host": target.host_header,
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",
            **(headers or {}),
        }
        for attempt in (1, 2):
            left = deadline.left()
            timeout = urllib3.Timeout(connect=min(self.connect_timeout_s, left), read=left)
            _current.deadline = deadline
            try:
                return pool.urlopen(
                    method,
                    target.path,
                    body=body,
                    headers=sent,
                    redirect=False,
                    retries=False,
                    timeout=timeout,
                    preload_content=False,
                    decode_content=False,
                    assert_same_host=False,
                )
            except ProtocolError as exc:
                deadline.left()  # shut down at the deadline: a timeout, not a broken connection
                # A kept-alive connection the server had closed: one fresh try (never for a
                # request with a body, which the server may have taken).
                if attempt == 1 and body is None:
                    continue
                raise _fetch_error(exc, target) from exc
            except HTTPError as exc:
                deadline.left()
                raise _fetch_error(exc, target) from exc
            finally:
                _current.deadline = None
        raise AssertionError("unreachable")


def _default_ca() -> str | None:
    try:
        import certifi

        return str(certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with requests
        return None


def _fetch_error(exc: Exception, target: Target) -> FetchError:
    where = target.host_header
    if isinstance(exc, NewConnectionError):  # (a subclass of ConnectTimeoutError in urllib3 2)
        return FetchError(f"cannot connect to {where}: {exc}", code="connection_failed")
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError) or isinstance(exc, TimeoutError):
        return FetchError(f"{where} did not answer in time", code="fetch_timeout")
    if isinstance(exc, SSLError):
        return FetchError(f"TLS with {where} failed: {exc}", code="tls_error")
    return FetchError(f"connection to {where} failed: {exc}", code="connection_failed")


def read_body(
    resp: urllib3.BaseHTTPResponse, limit: int, deadline: Deadline, *, image: bool = False
) -> bytes:
    """Read ``resp``'s body, at most ``limit`` bytes, before ``deadline``. The cap and the
    deadline are enforced while reading: past either, the connection is closed at once.
    With ``image``, the first bytes must look like an image (else ``not_an_image``)."""
    ok = False
    try:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise FetchError(f"the body is {int(declared)} bytes, the limit is {limit}", code="too_large")
        buf = bytearray()
        sniffed = not image
        while True:
            _read_timeout(resp, deadline.left())
            try:
                piece = resp.read1(_PIECE)
            except (ReadTimeoutError, TimeoutError) as exc:
                deadline.left()
                raise FetchError("the body did not arrive in time", code="fetch_timeout") from exc
            except (ProtocolError, HTTPError, OSError) as exc:
                deadline.left()  # shut down at the deadline: a timeout
                raise FetchError(f"the body broke off: {exc}", code="connection_failed") from exc
            if not piece:
                deadline.left()  # an end of file made by the deadline's shutdown is no end of body
                break
            buf += piece
            if len(buf) > limit:
                raise FetchError(f"the body is over the limit of {limit} bytes", code="too_large")
            if not sniffed and len(buf) >= 16:
                sniffed = True
                if not looks_like_image(bytes(buf[:16])):
                    raise FetchError("the body is not an image (by content)", code="not_an_image")
            deadline.left()
        ok = True
        return bytes(buf)
    finally:
        if not ok:
            resp.close()  # never return a half-read connection to the pool
        resp.release_conn()


def _read_timeout(resp: urllib3.BaseHTTPResponse, left: float) -> None:
    """Bound the next socket read by what is left of the deadline (a body dripped one byte at
    a time would otherwise reset the read timeout forever)."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(0.01, left))


# -- image URLs ---------------------------------------------------------------------------------


class Fetcher:
    """Fetch image URLs under the rules of this module; thread-safe."""

    def __init__(
        self,
        http: SafeHTTP,
        *,
        max_bytes: int,
        max_pixels: int,
        timeout_s: float = 30.0,
        max_redirects: int = 5,
        max_frames: int = DEFAULT_MAX_FRAMES,
        attempts: int = FETCH_ATTEMPTS,
    ) -> None:
        self.http = http
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.attempts = attempts

    @classmethod
    def from_settings(cls, s: Settings, resolver: Resolver | None = None) -> Fetcher:
        http = SafeHTTP(
            AllowList.parse(s.fetch_allow),
            connect_timeout_s=s.fetch_connect_timeout_s,
            resolver=resolver,
            per_host=s.fetch_threads,
        )
        return cls(
            http,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            timeout_s=s.fetch_timeout_s,
            max_redirects=s.fetch_max_redirects,
            max_frames=s.max_image_frames,
        )

    def close(self) -> None:
        self.http.close()

    def fetch(self, url: str) -> bytes:
        """The image at ``url``: its bytes, checked like an upload. Raises
        :class:`~batchvision.core.errors.BatchvisionError` with the per-image code.

        A transient failure (a refused or broken connection, a name that did not resolve,
        ``408``, ``429``, ``5xx``) is tried again, up to :attr:`attempts` times in all, after a
        short backoff or what the answer's ``Retry-After`` asks, while the deadline leaves room
        for it; the last failure is the image's error."""
        with Deadline(self.timeout_s) as deadline:
            for attempt in range(1, self.attempts + 1):
                try:
                    return self._fetch(parse_url(url), deadline)
                except FetchError as exc:
                    wait = max(backoff(attempt, RETRY_FIRST_S, RETRY_CAP_S), exc.retry_after or 0.0)
                    if attempt == self.attempts or not retryable(exc.code) or wait >= deadline.remaining():
                        raise
                    time.sleep(wait)
        raise AssertionError("unreachable")

    def _fetch(self, target: Target, deadline: Deadline) -> bytes:
        for hop in range(self.max_redirects + 1):
            resp = self.http.open("GET", target, deadline, headers={"Accept": "image/*"})
            if resp.status in _REDIRECTS and resp.headers.get("Location"):
                location = resp.headers["Location"]
                if _small(resp):  # read it, so the connection can be reused
                    read_body(resp, _PIECE, deadline)
                else:
                    _discard(resp)
                if hop == self.max_redirects:
                    raise FetchError(
                        f"more than {self.max_redirects} redirects (last to {location[:200]!r})",
                        code="too_many_redirects",
                    )
                try:
                    target = parse_url(urljoin(target.url, location))
                except FetchError as exc:
                    raise FetchError(f"redirect refused: {exc.message}", code=exc.code) from exc
                continue
            if not 200 <= resp.status < 300:
                _discard(resp)
                error = FetchError(
                    f"{target.host_header} answered HTTP {resp.status}", code=f"http_{resp.status}"
                )
                error.retry_after = retry_after(resp.headers)
                raise error
            data = read_body(resp, self.max_bytes, deadline, image=True)
            inspect_image(
                data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, max_frames=self.max_frames
            )
            return data
        raise AssertionError("unreachable")


def _small(resp: urllib3.BaseHTTPResponse) -> bool:
    declared = resp.headers.get("Content-Length", "")
    return declared.strip().isdigit() and int(declared) <= _PIECE


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    resp.close()
    resp.release_conn()


# -- fair scheduling of fetches ------------------------------------------------------------------

_Task = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...]]


class FairPool:
    """``threads`` threads that run the tasks of many keys (API keys), at most ``per_key`` of
    one key at a time, the keys taking turns (round robin).

    A key whose URLs point at servers that never answer holds ``per_key`` threads for a fetch
    timeout each, never all of them: the other keys' fetches start on the rest at once. The key
    ``""`` (jobs of an API without keys: one tenant, no one to be fair to) has no limit.
    """

    def __init__(self, threads: int, per_key: int, name: str = "fetch") -> None:
        self.per_key = max(1, per_key)
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[_Task]] = OrderedDict()
        self._running: Counter[str] = Counter()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{n}", daemon=True)
            for n in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` when a thread is free and ``key`` is under its limit."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the fetch pool is shut down")
            self._queues.setdefault(key, deque()).append((fut, fn, args))
            self._cond.notify()
        return fut

    def running(self, key: str) -> int:
        """Tasks of ``key`` running now."""
        with self._cond:
            return self._running[key]

    def shutdown(self) -> None:
        """Cancel what waits; running tasks finish on their own (daemon threads)."""
        with self._cond:
            self._closed = True
            waiting = [task[0] for q in self._queues.values() for task in q]
            self._queues.clear()
            self._cond.notify_all()
        for fut in waiting:
            fut.cancel()

    def _take(self) -> tuple[str, _Task] | None:
        for key in list(self._queues):
            if key and self._running[key] >= self.per_key:
                continue
            queue = self._queues[key]
            task = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # the next free thread serves another key first
            else:
                del self._queues[key]
            self._running[key] += 1
            return key, task
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                picked = self._take()
                while picked is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    picked = self._take()
            key, (fut, fn, args) = picked
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # the caller's future carries it
                        fut.set_exception(exc)
            finally:
                with self._cond:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                    self._cond.notify_all()


# -- URL blobs ------------------------------------------------------------------------------------

#: What a URL image's blob starts with (an upload never does: uploads are checked images).
URL_BLOB_PREFIX = b"BV-URL\n"


def url_blob(url: str) -> bytes:
    """The blob a URL image waits as: the marker and the URL (fetched by the worker)."""
    return URL_BLOB_PREFIX + url.encode()


def blob_url(blob: bytes) -> str | None:
    """The URL of a URL image's blob, ``None`` for an uploaded image."""
    return blob[len(URL_BLOB_PREFIX) :].decode() if blob.startswith(URL_BLOB_PREFIX) else None
