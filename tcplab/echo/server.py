"""RFC 862 echo over TCP (with backpressure) and UDP (with reflection guards)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime, IUDPTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from tcplab.flow import ReadThrottle, encryptEachWrite, plainSocket, throttleReadsOnWrites, unsentBytes, writeNow
from tcplab.interfaces import StreamTransport, globalReactor
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimiter
from tcplab.usagelog import UsageLog

log = Logger(namespace="tcplab.echo.server")

#: Datagrams from ports below this are dropped: well-known services (echo 7,
#: chargen 19, daytime 13, DNS 53, NTP 123...) answer every datagram, so
#: echoing to them starts an endless loop between two servers.
LOWEST_UDP_SOURCE_PORT = 1024

#: Seconds a connection closed for --idle-timeout has to take what it is still owed before it is aborted.
CLOSE_GRACE = 5.0

#: The largest datagram the UDP echo reads whole: a UDP payload is at most 65507 bytes over
#: IPv4 and 65527 over IPv6 (Twisted reads only 8192 by default and cuts the rest).
MAX_DATAGRAM = 65535

#: The reason a half-closed connection closed at once is given: made once, as Twisted makes its own
#: (building a Failure per connection was a few percent of a storm connection's cost).
_CLOSED = Failure(ConnectionDone())


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Send every byte back, and stop reading while the peer is not reading.

    A peer that shuts down only its sending side (``nc -N``, ncat, ``shutdown(SHUT_WR)``) gets
    every byte it is still owed before the close, as a pipe would give it.
    """

    factory: EchoFactory
    transport: StreamTransport

    def __init__(self) -> None:
        self.peer = "?"
        self.echoed = 0
        self.started = 0.0
        self._socket: socket.socket | None = None

    def connectionMade(self) -> None:
        self.peer = describeAddress(self.transport.getPeer())
        self.started = self.factory.clock.seconds()
        self.factory.accepted += 1
        self._socket = plainSocket(self.transport)
        if self._socket is None:
            encryptEachWrite(self.transport)
        self.throttleReads()
        self.factory.connections += 1
        self.factory.log.add("connection from {peer}", {"peer": self.peer})

    def throttleReads(self) -> None:
        throttleReadsOnWrites(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.echoed += len(data)
        self.factory.received += len(data)
        writeNow(self.transport, self._socket, data)

    def readConnectionLost(self) -> None:
        """The peer has sent all it will: close once what it is owed has been sent.

        The read throttle goes first: with a paused producer registered, a drained transport
        resumes the producer instead of closing; and there is nothing left to read anyway.
        """
        transport = self.transport
        transport.unregisterProducer()
        if self._socket is not None and not transport.dataBuffer and not transport._tempDataLen:  # type: ignore[attr-defined]
            # Every echo is in the kernel already, which sends it before the FIN: close now, as Twisted
            # closes a protocol that cannot half-close, instead of waiting a turn for the socket to be writable.
            transport.connectionLost(_CLOSED)  # type: ignore[attr-defined]
        else:
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never called: the echo does not shut down its own sending side alone."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections -= 1
        self.factory.echoed += self.echoed
        self.factory.log.add("{peer} disconnected, {echoed} bytes echoed", {"peer": self.peer, "echoed": self.echoed})
        if self.factory.usage is not None:
            idle = getattr(self, "closing", False)
            self.factory.usage.connection(
                self.started, self.peer, self.echoed, self.echoed, "idle" if idle else "closed",
                f"nothing sent or read for {self.factory.idleTimeout:g}s (--idle-timeout)" if idle
                else "closed cleanly" if reason is None or reason.check(ConnectionDone) else "connection lost")


class ProgressThrottle(ReadThrottle):
    """A ReadThrottle that also reports when the peer has read what it was owed."""

    def __init__(self, transport: StreamTransport, onProgress: Callable[[], None]) -> None:
        super().__init__(transport)
        self._onProgress = onProgress

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self._onProgress()


class TimedEcho(Echo, TimeoutMixin):
    """Echo under ``--idle-timeout``: a connection on which nothing arrives, and that does not read
    what it is owed either, for that long is closed (it would hold a socket forever otherwise).

    Reading is seen as what the server still owes going down (see :func:`unsentBytes`), so a
    slow reader with a full buffer is not idle. A class of its own, so that without a timeout
    the echo path does not pay for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self._owed: int | None = None

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater  # type: ignore[method-assign, assignment]
        super().connectionMade()
        self.setTimeout(self.factory.idleTimeout)

    def throttleReads(self) -> None:
        """Reading our echoes is progress: the buffer drained (here), or what we owe went down
        while it was full (:meth:`timeoutConnection`)."""
        self.transport.registerProducer(ProgressThrottle(self.transport, self.resetTimeout), True)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimeout()
        super().dataReceived(data)
        self._owed = unsentBytes(self.transport)

    def timeoutConnection(self) -> None:
        if self.closing:
            self.transport.abortConnection()
            return
        owed = unsentBytes(self.transport)
        if owed is not None and self._owed is not None and owed < self._owed:
            self._owed = owed
            self.setTimeout(self.factory.idleTimeout)
            return
        self.closing = True
        self.factory.timedOut += 1
        log.info("{peer} idle for {seconds:g}s (--idle-timeout): disconnecting", peer=self.peer,
                 seconds=self.factory.idleTimeout)
        self.transport.loseConnection()
        self.setTimeout(CLOSE_GRACE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        super().connectionLost(reason)


class ConnectionLog:
    """The connection lines of one reactor turn, logged as one event at the start of the next.

    Every connection is still logged as it comes and goes, but a storm of short connections
    does not pay a formatted, time-stamped, flushed log event per line (which costs more than
    serving the connection): a turn with one line logs it as it always was, a busier turn logs
    its lines together, one per line of the event's text. The turn's end is found with the
    reactor's ``callFromThread`` (no timer is left pending); a clock without it (a test's
    ``Clock``) gets every line logged at once.
    """

    def __init__(self, clock: object) -> None:
        self._nextTurn: Callable[..., object] | None = getattr(clock, "callFromThread", None)
        self._pending: list[tuple[str, dict[str, object]]] = []

    def add(self, format: str, fields: dict[str, object]) -> None:
        if self._nextTurn is None:
            log.info(format, **fields)
            return
        self._pending.append((format, fields))
        if len(self._pending) == 1:
            self._nextTurn(self.flush)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            format, fields = pending[0]
            log.info(format, **fields)
        elif pending:
            log.info("{lines}", lines="\n".join(format.format_map(fields) for format, fields in pending),
                     count=len(pending))


if TYPE_CHECKING:  # Factory is generic for the type checker in recent Twisted, not at run time in 23.10
    _EchoFactoryBase = Factory[Echo]
else:
    _EchoFactoryBase = Factory


class EchoFactory(_EchoFactoryBase):
    """Counts connections (accepted, live), bytes received (and so echoed) and bytes echoed by
    closed ones, for the log and ``--metrics``; ``idleTimeout`` > 0 closes connections idle that
    long (``clock`` times them: the reactor unless a test passes one); ``usage`` records each
    finished connection (``--usage-log``)."""

    noisy = False

    def __init__(self, idleTimeout: float = 0.0, clock: IReactorTime | None = None,
                 usage: UsageLog | None = None) -> None:
        self.idleTimeout = idleTimeout
        self.clock: IReactorTime = globalReactor() if clock is None else clock
        self.protocol = TimedEcho if idleTimeout else Echo
        self.usage = usage
        self.accepted = 0
        self.log = ConnectionLog(self.clock)
        self.connections = 0
        self.received = 0
        self.echoed = 0
        self.timedOut = 0

    def stopFactory(self) -> None:
        """The last lines of a stopping server are logged before it goes."""
        self.log.flush()


class UDPEcho(DatagramProtocol):
    """Echo datagrams, but never to a well-known service port, and at most
    ``rate`` replies a second per source address (UDP sources can be forged,
    so an open echo can be aimed at a victim)."""

    noisy = False
    transport: IUDPTransport

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.limiter = RateLimiter(rate, burst, clock)
        self.echoed = 0
        self.droppedPort = 0
        self.droppedRate = 0
        self._limited: set[str] = set()

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        host, port = addr[0], addr[1]
        if port < LOWEST_UDP_SOURCE_PORT:
            self.droppedPort += 1
            log.debug("dropped UDP datagram from service port {host}:{port}", host=host, port=port)
            return
        if not self.limiter.allow(host):
            self.droppedRate += 1
            if host not in self._limited and len(self._limited) < 1024:
                self._limited.add(host)
                log.warn("UDP replies to {host} rate-limited", host=host)
            return
        self._limited.discard(host)
        self.echoed += 1
        self.transport.write(datagram, addr)
