"""The backplane's wire format: the binary envelope one tcplab-multi node publishes to the others,
and the presence snapshot it keeps in the store (docs/PROTOCOL.md, "Backplane").

No network and no state here: :mod:`tcplab.multi.backplane` builds and reads these, and
:mod:`tcplab.multi.redis` carries them.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"TLB\x01"

#: Frame kinds.
LINES = b"L"
JOIN = b"J"
PART = b"P"
NICK = b"N"
HELLO = b"H"
BYE = b"B"
KINDS = frozenset((LINES, JOIN, PART, NICK, HELLO, BYE))

NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BadEnvelope(ValueError):
    """A message on the channel that is not a tcplab backplane envelope."""


@dataclass(frozen=True)
class Frame:
    """One event from one node: ``LINES`` (payload: bytes for every client, ``name`` the sender),
    ``JOIN``/``PART`` (``name``; payload: the notice, maybe empty), ``NICK`` (``name`` becomes
    ``other``), ``HELLO`` (a node (re)connected) or ``BYE`` (a node is stopping)."""

    kind: bytes
    name: str = ""
    other: str = ""
    payload: bytes = b""


@dataclass(frozen=True)
class Envelope:
    """One message: the node that sent it, its sequence number there (1, 2, ...), and its frames."""

    node: str
    seq: int
    frames: tuple[Frame, ...]


def encodeFrame(kind: bytes, name: str = "", other: str = "", payload: bytes = b"") -> bytes:
    rawName, rawOther = name.encode("utf-8"), other.encode("utf-8")
    if len(rawName) > 255 or len(rawOther) > 255:
        raise ValueError("a name in a backplane frame is at most 255 bytes")
    return b"".join((kind, bytes((len(rawName),)), rawName, bytes((len(rawOther),)), rawOther,
                     len(payload).to_bytes(4, "big"), payload))


def envelopeHeader(node: str) -> bytes:
    """What every message from ``node`` starts with (a node recognises its own messages by it)."""
    rawNode = node.encode("ascii")
    return MAGIC + bytes((len(rawNode),)) + rawNode


def encodeEnvelope(node: str, seq: int, frames: Iterable[bytes]) -> bytes:
    """``frames`` are :func:`encodeFrame` results."""
    return b"".join((envelopeHeader(node), seq.to_bytes(8, "big"), *frames))


def decodeEnvelope(data: bytes) -> Envelope:
    """The envelope in ``data``, or :class:`BadEnvelope`."""
    if data[:4] != MAGIC:
        raise BadEnvelope("not a tcplab backplane message")
    try:
        size = data[4]
        end = 5 + size
        node = data[5:end].decode("ascii")
        if NODE_ID.fullmatch(node) is None:
            raise BadEnvelope(f"bad node id {node!r}")
        if len(data) < end + 8:
            raise BadEnvelope("truncated header")
        seq = int.from_bytes(data[end:end + 8], "big")
        pos = end + 8
        frames = []
        while pos < len(data):
            kind = data[pos:pos + 1]
            if kind not in KINDS:
                raise BadEnvelope(f"unknown frame kind {kind!r}")
            nameEnd = pos + 2 + data[pos + 1]
            name = data[pos + 2:nameEnd].decode("utf-8")
            otherEnd = nameEnd + 1 + data[nameEnd]
            other = data[nameEnd + 1:otherEnd].decode("utf-8")
            payloadEnd = otherEnd + 4 + int.from_bytes(data[otherEnd:otherEnd + 4], "big")
            if otherEnd + 4 > len(data) or payloadEnd > len(data):
                raise BadEnvelope("truncated frame")
            frames.append(Frame(kind, name, other, data[otherEnd + 4:payloadEnd]))
            pos = payloadEnd
    except (IndexError, UnicodeDecodeError) as e:
        raise BadEnvelope(f"malformed: {e}") from None
    if seq < 1:
        raise BadEnvelope("sequence numbers start at 1")
    return Envelope(node, seq, tuple(frames))


def makeNodeId() -> str:
    """``HOST.PID.RANDOM``: unique per process run, readable in logs."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}.{os.getpid()}.{secrets.token_hex(3)}"


def encodeSnapshot(seq: int, names: Iterable[str]) -> bytes:
    """A node's presence value: the sequence number it reflects, then its names in join order."""
    return b"\n".join((b"%d" % seq, *(name.encode("utf-8") for name in names)))


def decodeSnapshot(value: bytes) -> tuple[int, list[str]]:
    head, *names = value.split(b"\n")
    try:
        return int(head), [name.decode("utf-8") for name in names if name]
    except (ValueError, UnicodeDecodeError):
        raise BadEnvelope("malformed presence snapshot") from None
