"""``BATCHVISION_FETCH_ALLOW`` and ``BATCHVISION_WEBHOOK_ALLOW``: the networks and host names
that URLs may reach although the address rules refuse them. Parsed (and refused when an entry
is neither a network nor a host name) here, where the settings check it at start."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A host name as URLs carry it after IDNA: dot-separated labels of letters, digits, `-` and `_`.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

_FORMS = (
    "a network or address (`10.1.0.0/16`, `127.0.0.1`, `[::1]`) nor a host name "
    "(`images.internal`, `*.corp.example`)"
)


@dataclass(frozen=True)
class AllowList:
    """Networks, host names and ``*.suffix`` names exempt from the address rules."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> AllowList:
        """The list of comma-separated entries; ``ValueError`` naming the first entry that is
        neither a network nor a host name (a URL, a port, a bad prefix length, ``*``)."""
        networks = []
        hosts = set()
        suffixes = []
        for item in (i.strip().lower() for i in raw.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            wildcard = item.startswith("*.")
            name = _host_name(item[2:] if wildcard else item)
            if name is None:
                raise ValueError(f"entry {item[:100]!r} is neither {_FORMS}")
            if wildcard:
                suffixes.append("." + name)
            else:
                hosts.add(name)
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(host.endswith(s) for s in self.suffixes)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


def _host_name(text: str) -> str | None:
    """``text`` as the host name a URL would carry (IDNA for a Unicode one), or ``None``."""
    name = text.rstrip(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return name if _HOST.fullmatch(name) and len(name) <= 253 else None


#: Nothing exempt: the address rules alone.
NOTHING = AllowList()
