"""Peer addresses a dmoe process agrees to dial: ``host:port`` over TCP, nothing else.

Addresses reach a process from strangers (a DHT node's ``sender``, an expert declaration read
from the DHT), and gRPC would happily dial ``unix:/var/run/docker.sock``, ``dns:///...`` or
an ``ipv4:`` list. So every such address is checked here first: a DNS name, a dotted IPv4
address or a bracketed IPv6 address, then a port in 1-65535. The unspecified addresses
(0.0.0.0, [::]) are refused too: nothing answers there.

The other direction, who is calling: :func:`peer_host` reads gRPC's ``context.peer()``.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_ADDRESS_CHARS = 300


def check_peer_address(address: str) -> str:
    """Return ``address`` when it is a dialable ``host:port``; else raise ``ValueError``."""
    if not address or len(address) > MAX_ADDRESS_CHARS:
        raise ValueError("not host:port")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not host:port with a port in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("bad IPv6 address") from None
    else:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            labels = host.rstrip(".").split(".")
            if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
                raise ValueError("host is not a DNS name, IPv4 or [IPv6] address") from None
            return address
    if ip.is_unspecified:
        raise ValueError("unspecified address (0.0.0.0 / [::])")
    return address


def is_peer_address(address: str) -> bool:
    try:
        check_peer_address(address)
    except ValueError:
        return False
    return True


def peer_host(peer: str) -> str | None:
    """The caller's IP address from gRPC's ``context.peer()`` string, or None when the caller
    is not on TCP/IP (``unix:...``) or the string is not one gRPC writes.

    ``ipv4:10.1.2.3:5000`` -> ``10.1.2.3``; ``ipv6:[::1]:5000`` (or URL-quoted,
    ``ipv6:%5B::1%5D:5000``) -> ``::1``; an IPv4-mapped IPv6 address -> its IPv4 address, and a
    zone (``%eth0``) is dropped, so one host has one spelling: rate limits and rejection logs
    are keyed by it, and the DHT rewrites a loopback announce with it.
    """
    scheme, _, rest = unquote(peer).partition(":")
    host = rest.rpartition(":")[0]
    try:
        if scheme == "ipv4":
            return str(ipaddress.IPv4Address(host))
        if scheme == "ipv6" and host.startswith("[") and host.endswith("]"):
            address = ipaddress.IPv6Address(host[1:-1].partition("%")[0])
            return str(address.ipv4_mapped or address)
    except ValueError:
        pass
    return None
