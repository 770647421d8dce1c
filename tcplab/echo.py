"""RFC 862 echo over TCP (with backpressure) and UDP (with reflection guards)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcplab.flow import throttleReadsOnWrites
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimiter

log = Logger(namespace="tcplab.echo")

#: Datagrams from ports below this are dropped: well-known services (echo 7,
#: chargen 19, daytime 13, DNS 53, NTP 123...) answer every datagram, so
#: echoing to them starts an endless loop between two servers.
LOWEST_UDP_SOURCE_PORT = 1024


class Echo(Protocol):
    """Send every byte back, and stop reading while the peer is not reading."""

    factory: EchoFactory

    def __init__(self) -> None:
        self.peer = "?"
        self.echoed = 0

    def connectionMade(self) -> None:
        self.peer = describeAddress(self.transport.getPeer())
        throttleReadsOnWrites(self.transport)
        self.factory.connections += 1
        log.info("connection from {peer}", peer=self.peer)

    def dataReceived(self, data: bytes) -> None:
        self.echoed += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.connections -= 1
        self.factory.echoed += self.echoed
        log.info("{peer} disconnected, {echoed} bytes echoed", peer=self.peer, echoed=self.echoed)


class EchoFactory(Factory):
    """Counts live connections and bytes echoed by closed ones."""

    protocol = Echo
    noisy = False

    def __init__(self) -> None:
        self.connections = 0
        self.echoed = 0


class UDPEcho(DatagramProtocol):
    """Echo datagrams, but never to a well-known service port, and at most
    ``rate`` replies a second per source address (UDP sources can be forged,
    so an open echo can be aimed at a victim)."""

    noisy = False

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.limiter = RateLimiter(rate, burst, clock)
        self.echoed = 0
        self.droppedPort = 0
        self.droppedRate = 0
        self._limited: set[str] = set()

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
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
