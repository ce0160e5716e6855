"""Peer addresses a dmoe process agrees to dial: ``host:port`` over TCP, nothing else.

Addresses reach a process from strangers (a DHT node's ``sender``, an expert declaration read
from the DHT), and gRPC would happily dial ``unix:/var/run/docker.sock``, ``dns:///...`` or
an ``ipv4:`` list. So every such address is checked here first: a DNS name, a dotted IPv4
address or a bracketed IPv6 address, then a port in 1-65535. The unspecified addresses
(0.0.0.0, [::]) are refused too: nothing answers there.
"""

from __future__ import annotations

import ipaddress
import re

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
