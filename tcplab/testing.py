"""In-memory transports and connections for testing code built on tcplab, as ``treq.testing`` is for HTTP.

Twisted's ``StringTransport`` records what a protocol writes but ignores the two things tcplab's
protocols depend on most: a full send buffer pausing the registered producer, and a TCP
half-close (``loseWriteConnection``).  ``FakeTransport`` adds both, so backpressure and
"ERR, then FIN, then drain" can be tested without a socket.  ``connectedPair`` joins a server
and a client protocol in memory over ``twisted.test.iosim``, with half-close carried across,
so whole client/server exchanges run under ``SynchronousTestCase`` on a ``Clock``.

Example::

    clock = Clock()
    receiver = FileReceiverFactory(...).buildProtocol(CLIENT)
    sender = FileSender(clock, 10)
    pump = connectedPair(receiver, sender, clock=clock)
    d = sender.put(...)
    pump.flush()
    self.successResultOf(d)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    INegotiated,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from zope.interface import alsoProvides, implementer

__all__ = [
    "CLIENT_ADDRESS",
    "SERVER_ADDRESS",
    "FakeTransport",
    "MemoryTransport",
    "Pump",
    "connectToFactory",
    "connectedPair",
]

#: The addresses the in-memory pairs report unless told otherwise (loopback, as the real tests use).
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 9000)


@implementer(IHalfCloseableDescriptor)
class FakeTransport(StringTransport):  # type: ignore[misc]  # protocols check providedBy, then call loseWriteConnection
    """A ``StringTransport`` that treats its producer and its sending side as a TCP socket does.

    - A registered streaming producer is paused once more than ``bufferSize`` bytes wait to be
      sent (``bufferSize=0``: after every write, like a socket whose buffer is always full), and
      resumed when ``drain`` says the peer read them; a pull producer is asked for more on
      registration and on every ``drain``.  ``bufferSize=None`` never pauses.
    - ``loseWriteConnection`` shuts down the sending side only (``writeClosed``), as
      ``shutdown(SHUT_WR)`` does; reading goes on.
    - ``abortConnection`` is remembered (``aborted``), so a test can tell an abort from a close.
    - ``tls=True`` makes it provide ``INegotiated``, as Twisted's TLS wrapper does.

    ``writes`` keeps each ``write`` separately, for tests about how output is cut up.
    """

    writeClosed = False
    aborted = False

    def __init__(self, peerAddress: IAddress | None = None, bufferSize: int | None = None, *,
                 hostAddress: IAddress | None = None, tls: bool = False) -> None:
        super().__init__(hostAddress=hostAddress, peerAddress=peerAddress)
        self.bufferSize = bufferSize
        self.unsent = 0
        self.writes: list[bytes] = []
        if tls:
            alsoProvides(self, INegotiated)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        self.unsent += len(data)
        if self.producer is not None and self.bufferSize is not None and self.unsent > self.bufferSize:
            self.producer.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()

    def drain(self) -> None:
        """The peer read everything written so far: resume (or, for a pull producer, poll) the producer."""
        self.unsent = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    def take(self) -> bytes:
        """What was written since the last ``take`` (and forget it)."""
        data = self.value()
        self.clear()
        self.writes.clear()
        return data

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@implementer(IHalfCloseableDescriptor)
class MemoryTransport(iosim.FakeTransport):  # type: ignore[misc]
    """One end of an in-memory connection (``iosim.FakeTransport``) that can half-close, as TCP can."""

    writeClosed = False
    finDelivered = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Pump(iosim.IOPump):
    """An ``iosim.IOPump`` that also carries a half-close across once the writer's bytes are delivered.

    The peer's protocol gets ``readConnectionLost`` if it is half-closeable, else the whole
    connection is lost on both sides, as a TCP socket without half-close support behaves.
    """

    clientIO: MemoryTransport
    serverIO: MemoryTransport

    def pump(self, debug: bool = False, advanceClock: bool = True) -> bool:
        if super().pump(debug, advanceClock):
            return True
        for this, other in ((self.clientIO, self.serverIO), (self.serverIO, self.clientIO)):
            if this.writeClosed and not this.finDelivered and not (this.disconnected or other.disconnected):
                this.finDelivered = True
                if IHalfCloseableProtocol.providedBy(other.protocol):
                    other.protocol.readConnectionLost()
                else:
                    this.loseConnection()
                return True
        return False

    def flush(self, debug: bool = False, advanceClock: bool = True) -> bool:
        """Move bytes both ways until neither side has anything more to say (bounded)."""
        return bool(super().flush(debug, advanceClock))


def connectedPair(server: IProtocol, client: IProtocol, *, clock: Clock | None = None,
                  serverAddress: IAddress = SERVER_ADDRESS, clientAddress: IAddress = CLIENT_ADDRESS,
                  greet: bool = True) -> Pump:
    """Connect ``server`` and ``client`` in memory; ``pump.flush()`` then delivers what each wrote.

    With ``clock`` given, each pump also runs the calls due on it (``callLater(0, ...)``), so a
    protocol driven by a ``Clock`` makes progress exactly as it would on a reactor.
    """
    serverIO = MemoryTransport(server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress)
    clientIO = MemoryTransport(client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress)
    server.makeConnection(serverIO)
    client.makeConnection(clientIO)
    pump = Pump(client, server, clientIO, serverIO, False, clock=clock)
    if greet:
        pump.flush()
    return pump


def connectToFactory(factory: IProtocolFactory, client: IProtocol, *, clock: Clock | None = None,
                     clientAddress: IAddress = CLIENT_ADDRESS, serverAddress: IAddress = SERVER_ADDRESS,
                     greet: bool = True) -> tuple[IProtocol, Pump]:
    """Connect ``client`` to a protocol built by a server ``factory``, as a listening port would.

    Returns the server's protocol and the pump.  A factory that refuses (``buildProtocol``
    returns None) is a ``ValueError``: a test that expects a refusal should call it directly.
    """
    server = factory.buildProtocol(clientAddress)
    if server is None:
        raise ValueError("the factory refused the connection")
    return server, connectedPair(server, client, clock=clock, serverAddress=serverAddress,
                                 clientAddress=clientAddress, greet=greet)
