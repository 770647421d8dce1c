"""Readable names for transport addresses, for logs and for chat names."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from tcplab.escaping import escapeText


def describeAddress(address: object) -> str:
    """``127.0.0.1:5000``, ``[::1]:5000`` or ``unix:/path`` (``unix`` for an unnamed socket),
    safe to print."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        # A client chooses the path it binds to: escaped, it cannot write to a terminal or a log.
        return f"unix:{escapeText(name)}" if name else "unix"
    return str(address)
