"""Backpressure: stop reading from a peer while what we owe it cannot be sent."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from zope.interface import implementer

from tcplab.interfaces import StreamTransport


@implementer(IPushProducer)
class ReadThrottle:
    """Registered as the producer of a transport's own writes, so a full write
    buffer pauses reading from that same transport (and a drained one resumes it).

    Works for TCP, UNIX and TLS transports alike: each of them (or the transport
    under a TLS wrapper) can pause and resume its reading.
    """

    def __init__(self, transport: StreamTransport) -> None:
        self._transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self.paused = False


def throttleReadsOnWrites(transport: StreamTransport) -> ReadThrottle:
    """Make ``transport`` stop reading while its own outgoing buffer is full."""
    throttle = ReadThrottle(transport)
    transport.registerProducer(throttle, True)
    return throttle


def plainSocket(transport: StreamTransport) -> socket.socket | None:
    """The socket under a plain TCP or UNIX transport (None for TLS and anything else),
    for :func:`writeNow`."""
    return transport.socket if isinstance(transport, tcp.Connection) else None


def encryptEachWrite(transport: StreamTransport) -> None:
    """Make a Twisted TLS transport encrypt each write at once instead of gathering small ones
    until the next reactor turn.

    Twisted's TLS drops what it has gathered when a close_notify is read in the same turn: a
    client that half-closes over TLS (sends its data, then close_notify, then reads) would
    lose up to 64 KB of its echo. Written at once, every byte read before the close_notify
    goes out before the server's own close_notify.
    """
    if isinstance(transport, BufferingTLSTransport):
        transport.write = TLSMemoryBIOProtocol.write.__get__(transport)  # type: ignore[method-assign]


def writeNow(transport: StreamTransport, sock: socket.socket | None, data: bytes) -> None:
    """Write ``data``, straight into ``sock`` when the transport has nothing queued.

    ``transport.write`` only queues the bytes until the next reactor turn: an extra
    loop iteration and two epoll_ctl calls per write, most of a small echo's cost.
    Sending at once when nothing is queued (as asyncio does) keeps the order, and
    whatever the socket does not take goes through ``transport.write``, so flow
    control, backpressure and error handling stay Twisted's.
    """
    # Twisted internals here and in unsentBytes: tests/test_twistedprivate.py names any a new Twisted drops.
    if sock is not None and not transport.dataBuffer and not transport._tempDataLen:  # type: ignore[attr-defined]
        if transport.disconnecting:  # type: ignore[attr-defined]
            return
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def unsentBytes(transport: object) -> int | None:
    """Bytes written to ``transport`` that its peer has not taken yet: what Twisted (and a TLS
    layer) still buffers, plus the kernel's send queue (TIOCOUTQ: for TCP, bytes sent but not
    acknowledged; for UNIX, bytes not read).

    It only goes down as the peer reads, so a drop in it tells a slow reader from a stalled one,
    and a socket buffer of megabytes draining over a slow link counts as progress. None when no
    socket is found under the transport (a test's fake transport).
    """
    unsent = 0
    for _ in range(4):  # the protocol's transport, a TLS layer, the socket's transport
        if transport is None:
            return None
        unsent += len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
        unsent += getattr(transport, "_tempDataLen", 0)
        unsent += sum(map(len, getattr(transport, "_appSendBuffer", None) or ()))
        getHandle = getattr(transport, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        if isinstance(handle, socket.socket):
            try:
                unsent += struct.unpack("i", fcntl.ioctl(handle.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except (OSError, ValueError):  # not Linux, or a socket without a send queue
                pass
            return unsent
        transport = getattr(transport, "transport", None)
    return None


class TurnWrites:
    """Stands for a transport whose only use is ``write`` (a :class:`~tcplab.multi.sendqueue.SendQueue`):
    the writes of one reactor turn reach the transport as one write at the start of the next.

    A broadcast writes a line to every client, and a storm of short connections adds a join and
    a leave notice for each: Twisted's ``transport.write`` already gathers a turn's writes into one
    ``send``, but its bookkeeping per write is most of a broadcast's cost. Here a write is a list
    append. Once ``FLUSH_AT`` bytes are gathered they are written at once, so the transport's
    buffer still fills, and pauses its producer, as soon as it would have; :meth:`flush` writes
    the gathered bytes now (before writing to the transport directly).
    """

    __slots__ = ("_parts", "_size", "_turns", "transport")

    #: Gathered bytes written at once: well under a transport's 64 KiB buffer.
    FLUSH_AT = 16384

    def __init__(self, transport: StreamTransport, turns: WriteTurns) -> None:
        self.transport = transport
        self._turns = turns
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        parts = self._parts
        if not parts:
            self._turns.mark(self)
        parts.append(data)
        self._size += len(data)
        if self._size >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self.transport.write(self.take())

    def take(self) -> bytes:
        """The gathered bytes, forgotten here (for a closing client, to write them with what follows)."""
        parts = self._parts
        self._parts = []
        self._size = 0
        return parts[0] if len(parts) == 1 else b"".join(parts)


class WriteTurns:
    """The :class:`TurnWrites` with bytes gathered this turn, written out at the start of the next.

    The next turn is reached with the reactor's ``callFromThread``, which leaves no timer pending;
    a clock without it (a test's ``Clock``), or a transport that is not a plain socket (TLS gathers
    its own writes), gets the transport itself from :meth:`writesFor`, written at once.
    """

    def __init__(self, clock: object) -> None:
        self._nextTurn = getattr(clock, "callFromThread", None)
        self._marked: list[TurnWrites] = []

    def writesFor(self, transport: StreamTransport) -> StreamTransport | TurnWrites:
        if self._nextTurn is None or plainSocket(transport) is None:
            return transport
        return TurnWrites(transport, self)

    def mark(self, writes: TurnWrites) -> None:
        if not self._marked:
            self._nextTurn(self.flushAll)  # type: ignore[misc]
        self._marked.append(writes)

    def flushAll(self) -> None:
        marked, self._marked = self._marked, []
        for writes in marked:
            writes.flush()
