"""Several hosts on one Linux machine: network namespaces on a private bridge (test and
benchmark tooling: the multi-host tests and ``bench/multihost.py``).

:class:`Network` makes a bridge in the root namespace with the first address of a private
``/24`` (the root namespace is the "client" host: tests and benchmarks run there), and one
namespace per :class:`Host`, joined to the bridge by a veth pair, with its own address, its
loopback up, and a hosts file (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over
``/etc/hosts``) naming every host, as compose's service names resolve. A namespace has no
other route: its processes reach only the other hosts and the client, never another address.

Faults: :meth:`Network.cut` takes a host's link down (the host is cut off from every other
host, the client included), :meth:`Network.heal` brings it back, :meth:`Network.remove` kills
the host's processes and deletes its namespace for good.

Cleanup is guaranteed as far as a process can guarantee it: :meth:`Network.close` (also on
``with`` exit), an ``atexit`` hook and a SIGTERM/SIGHUP handler (where none was installed)
delete every namespace, link, bridge and hosts file this process made, and a new
:class:`Network` first deletes what crashed runs left (recorded under :data:`STATE_DIR` with
their pid). Names carry a random run id, so parallel runs never collide.

Needs root and iproute2 (``ip``); :func:`unavailable` says why it cannot work here.
The batchvision stack on such hosts: :class:`HostStack`.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import RedisNode
from batchvision.cli.runner import Service, cli_argv, http_ok
from batchvision.core.settings import Settings

#: Every namespace is ``bv<run>-<host>``, every link ``bv<run>h<n>``, the bridge ``bvbr<run>``.
NS_NAME = re.compile(r"^bv([0-9a-f]{6})-[a-z0-9-]+$")
LINK_NAME = re.compile(r"^bv(?:br)?([0-9a-f]{6})(?:h\d+)?$")
#: What each run made, with its pid: a later run deletes what a dead run left.
STATE_DIR = Path("/run/batchvision-netns")
NETNS_ETC = Path("/etc/netns")
#: Test subnets are ``10.213.<n>.0/24``, ``n`` chosen free at random.
SUBNET_BASE = "10.213"


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here (``None``: they can). Makes and deletes one."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: apt-get install iproute2)"
    probe = f"bv{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    _ip("netns", "delete", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace: a name the other hosts resolve, an address, the root side of its link."""

    name: str
    netns: str
    address: str
    link: str
    services: list[Service] = field(default_factory=list)
    is_cut: bool = False

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` keeps the pid: it execs)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def service(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: str = "",
        url: str = "",
        health_url: str = "",
    ) -> Service:
        """A :class:`Service` whose process runs on this host (not started yet)."""
        svc = Service(name, self.argv(argv), dict(env), url=url, health_url=health_url, log_path=log_path)
        self.services.append(svc)
        return svc

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: str = "",
        url: str = "",
        health_url: str = "",
    ) -> Service:
        """:meth:`service`, started."""
        svc = self.service(name, argv, env, log_path, url, health_url)
        svc.start()
        return svc

    def kill(self) -> None:
        """SIGKILL every process on this host: its services' process groups, then any
        process left in the namespace (``ip netns pids``)."""
        for svc in self.services:
            if svc.proc is not None and svc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(svc.proc.pid, signal.SIGKILL)
        _kill_namespace_pids(self.netns)
        for svc in self.services:
            if svc.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    svc.proc.wait(10)


def _kill_namespace_pids(netns: str) -> None:
    for raw in _ip("netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(raw), signal.SIGKILL)


class Network:
    """A private subnet: a bridge (the client's address) and hosts in namespaces."""

    def __init__(self, subnet: str | None = None) -> None:
        self.run_id = secrets.token_hex(3)
        self.bridge = f"bvbr{self.run_id}"
        self._subnet = subnet
        self.network: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self._made_links: list[str] = []
        self._next = 2
        self._links = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def create(self) -> Network:
        """Delete what crashed runs left, pick a free subnet, make and address the bridge."""
        reason = unavailable()
        if reason:
            raise NetnsError(reason)
        cleanup_stale()
        self.network = ipaddress.IPv4Network(self._subnet or _free_subnet())
        _register(self)
        self._save()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        self._save()
        _ip("addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def close(self) -> None:
        """Kill every host's processes, delete namespaces, links, bridge, hosts files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for host in list(self.hosts.values()):
            self._delete_host(host)
        for link in reversed(self._made_links):
            _ip("link", "delete", link, check=False)
        (STATE_DIR / f"{self.run_id}.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()  # only if no other run is recorded
        _unregister(self)

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hosts -------------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: where the client's requests come from."""
        assert self.network is not None, "create() the network first"
        return str(self.network.network_address + 1)

    def add_host(self, name: str) -> Host:
        """A new namespace called ``name`` by the others, linked to the bridge, addressed."""
        assert self.network is not None, "create() the network first"
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name) or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        if self._next >= self.network.num_addresses - 1:
            raise NetnsError(f"no address left in {self.network}")
        self._links += 1
        host = Host(
            name=name,
            netns=f"bv{self.run_id}-{name}",
            address=str(self.network.network_address + self._next),
            link=f"bv{self.run_id}h{self._links}",
        )
        self._next += 1
        self.hosts[name] = host
        self._save()
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.link, "master", self.bridge)
        _ip("link", "set", host.link, "up")
        ns = ("-n", host.netns)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "addr", "add", f"{host.address}/{self.network.prefixlen}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        self._write_hosts_files()
        return host

    def cut(self, host: Host) -> None:
        """Take ``host``'s link down: nothing reaches it, it reaches nothing. Packets are
        dropped, as when a cable or a switch port goes: open connections get no reset (they
        wait on their timeouts), a new one fails once ARP gives up (``No route to host``)."""
        _ip("link", "set", host.link, "down")
        host.is_cut = True

    def heal(self, host: Host) -> None:
        """Bring ``host``'s link back up."""
        _ip("link", "set", host.link, "up")
        host.is_cut = False

    def remove(self, host: Host) -> None:
        """The host is gone for good: its processes killed (SIGKILL), its namespace deleted."""
        self._delete_host(host)
        self._save()

    def hosts_file(self, host: Host | None = None) -> str:
        """The ``/etc/hosts`` of ``host``: localhost, every host by name, the client."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if host is not None:
            # Every namespace shares this machine's hostname (one UTS namespace): it resolves
            # to the host's own address, as a container's hostname does.
            lines.append(f"{host.address}\t{socket.gethostname()}")
        lines += [f"{h.address}\t{h.name}" for h in self.hosts.values()]
        lines.append(f"{self.gateway}\tclient")
        return "\n".join(lines) + "\n"

    def _write_hosts_files(self) -> None:
        for host in self.hosts.values():
            folder = NETNS_ETC / host.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(self.hosts_file(host))

    def _delete_host(self, host: Host) -> None:
        host.kill()
        _ip("netns", "delete", host.netns, check=False)
        _ip("link", "delete", host.link, check=False)  # gone with the namespace, normally
        shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
        self.hosts.pop(host.name, None)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty: it may hold others' files

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "namespaces": [h.netns for h in self.hosts.values()],
            "links": [*self._made_links, *(h.link for h in self.hosts.values())],
        }
        (STATE_DIR / f"{self.run_id}.json").write_text(json.dumps(state))


def namespaces() -> list[str]:
    """Names of the network namespaces that exist now."""
    return [line.split(" ")[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]


def link_exists(name: str) -> bool:
    """Whether the root namespace has a link called ``name``."""
    return bool(_ip("link", "show", name, check=False).strip())


def _free_subnet() -> str:
    used = _ip("-4", "-o", "addr", "show") + _ip("-4", "route", "show", check=False)
    taken = {int(m) for m in re.findall(rf"\b{re.escape(SUBNET_BASE)}\.(\d+)\.", used)}
    choices = [n for n in range(1, 255) if n not in taken]
    if not choices:
        raise NetnsError(f"no free {SUBNET_BASE}.X.0/24 subnet")
    return f"{SUBNET_BASE}.{random.choice(choices)}.0/24"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete the namespaces, links and hosts files of runs whose process is gone (a crashed
    or killed run); returns what was deleted. Runs of live processes are left alone."""
    live: set[str] = set()
    removed: list[str] = []
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            try:
                pid = int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pid = -1
            if pid > 0 and _alive(pid):
                live.add(path.stem)
            else:
                path.unlink(missing_ok=True)
    for name in namespaces():
        m = NS_NAME.match(name)
        if m and m.group(1) not in live:
            _kill_namespace_pids(name)
            _ip("netns", "delete", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = LINK_NAME.match(name)
        if m and m.group(1) not in live:
            _ip("link", "delete", name, check=False)
            removed.append(name)
    if NETNS_ETC.is_dir():
        for folder in NETNS_ETC.iterdir():
            m = NS_NAME.match(folder.name)
            if m and m.group(1) not in live:
                shutil.rmtree(folder, ignore_errors=True)
    return removed


# -- the guard: whatever happens to this process, its namespaces go with it ---------------

_LIVE: dict[str, Network] = {}
_GUARDED = False


def _register(net: Network) -> None:
    global _GUARDED
    _LIVE[net.run_id] = net
    if _GUARDED:
        return
    _GUARDED = True
    atexit.register(close_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: atexit still runs
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def _unregister(net: Network) -> None:
    _LIVE.pop(net.run_id, None)


def close_all() -> None:
    """Close every :class:`Network` of this process."""
    for net in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            net.close()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# -- the batchvision stack on such hosts ----------------------------------------------------

REDIS_PORT = 6379


@dataclass
class HostStack:
    """The compose stack as hosts of ``net``: ``redis``, ``api`` and ``worker-N``, started
    with the compose file's commands (``redis-server`` with AOF and ``noeviction`` behind a
    password, ``batchvision api``, ``batchvision worker``) and environment: the services reach
    Redis as ``redis://:<password>@redis:6379/0``, listen on their default ports, each on its
    own address. The client (this process) reaches them by address: :attr:`api_url`,
    :attr:`redis_url`, :meth:`client_settings`."""

    net: Network
    settings: Settings
    log_dir: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    #: The API listens on its host's address, so it requires a key (as a deployment would).
    api_key: str = field(default_factory=lambda: secrets.token_hex(16))
    redis: Host | None = None
    api: Host | None = None
    workers: dict[str, Host] = field(default_factory=dict)
    _redis_dir: tempfile.TemporaryDirectory[str] | None = None

    def service_settings(self) -> Settings:
        """What every service is configured with (compose: ``x-batchvision-env``)."""
        return self.settings.replace(
            redis_url=f"redis://:{self.password}@redis:{REDIS_PORT}/0",
            api_keys=self.api_key,
            api_port=8000,
            worker_metrics_port=9808,
        )

    def client_settings(self) -> Settings:
        """The same settings as seen from the client: Redis by address."""
        return self.service_settings().replace(redis_url=self.redis_url)

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://:{self.password}@{self.redis.address}:{REDIS_PORT}/0"

    @property
    def api_url(self) -> str:
        assert self.api is not None
        return f"http://{self.api.address}:8000"

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends with every ``/v1`` request."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def metrics_url(self, worker: Host) -> str:
        return f"http://{worker.address}:9808/metrics"

    def _env(self) -> dict[str, str]:
        return {**self.service_settings().to_env(include_secrets=True), **self.extra_env}

    def _log(self, name: str) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        path.unlink(missing_ok=True)
        return str(path)

    def start_redis(self, timeout: float = 20.0) -> Host:
        host = self.redis = self.net.add_host("redis")
        self._redis_dir = tempfile.TemporaryDirectory(prefix="batchvision-redis-")
        server = RedisNode(
            port=REDIS_PORT, data_dir=self._redis_dir.name, password=self.password, bind="0.0.0.0"
        )
        host.start("redis", [*server.argv(), "--maxmemory", "1gb"], {}, url=self.redis_url)
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.close()
        return host

    def start_api(self, timeout: float = 120.0) -> Host:
        host = self.api = self.net.add_host("api")
        svc = host.start(
            "api",
            cli_argv("api"),  # compose: `batchvision api` (binds 0.0.0.0:8000)
            self._env(),
            log_path=self._log("api"),
            url=self.api_url,
            health_url=f"{self.api_url}/healthz",
        )
        deadline = time.monotonic() + timeout
        while not http_ok(svc.health_url):
            if svc.proc is not None and svc.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {svc.proc.returncode}: see {svc.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not answer at {svc.health_url}")
            time.sleep(0.2)
        return host

    def add_worker(self, name: str | None = None) -> Host:
        """A worker host (``worker-N``) running ``batchvision worker`` (not waited for:
        see :meth:`wait_workers`)."""
        name = name or f"worker-{len(self.workers) + 1}"
        host = self.workers[name] = self.net.add_host(name)
        # compose names the Celery node worker@<container hostname>; the namespaces share one
        # hostname, so the node is named after the host explicitly.
        host.start(
            "worker",
            cli_argv("worker", "--name", f"worker@{name}"),
            self._env(),
            log_path=self._log(name),
            url=self.metrics_url(host),
        )
        return host

    def wait_workers(self, count: int | None = None, timeout: float = 240.0) -> None:
        """Block until ``count`` (default: every started) workers answer a ping."""
        wait_for_workers(self.client_settings(), count=count or len(self.workers), timeout=timeout)

    def remove_worker(self, host: Host) -> None:
        self.net.remove(host)
        self.workers.pop(host.name, None)

    def stop_workers(self) -> None:
        """Warm-stop and remove every worker host."""
        for host in list(self.workers.values()):
            for svc in host.services:
                svc.stop(timeout=20)
            self.remove_worker(host)

    def close(self) -> None:
        self.stop_workers()
        for host in (self.api, self.redis):
            if host is not None:
                for svc in host.services:
                    svc.stop(timeout=10)
                self.net.remove(host)
        if self._redis_dir is not None:
            self._redis_dir.cleanup()
