"""The echo server: byte-exact echo, backpressure, UDP guards, and the twistd glue."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial import unittest

from tcplab.echo import tap as echotap
from tcplab.echo.server import Echo, EchoFactory, UDPEcho
from tcplab.listening import CannotListen, withBacklog
from tcplab.peers import describeAddress
from tcplab.ratelimit import RateLimiter


def connectedEcho() -> tuple[Echo, StringTransport]:
    factory = EchoFactory()
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    return protocol, transport


class EchoProtocolTests(unittest.TestCase):
    def test_everyFragmentSize(self) -> None:
        """Whatever way the bytes are split on arrival, the same bytes come back."""
        data = bytes(range(256)) * 4 + b"\r\n\x00\xff line\n"
        for size in range(1, len(data) + 1):
            protocol, transport = connectedEcho()
            for i in range(0, len(data), size):
                protocol.dataReceived(data[i : i + size])
            self.assertEqual(transport.value(), data)
            self.assertEqual(protocol.echoed, len(data))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=2048), max_size=20))
    def test_arbitraryBinaryChunks(self, chunks: list[bytes]) -> None:
        """Any binary data, in any chunks, comes back exactly as sent."""
        protocol, transport = connectedEcho()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertEqual(transport.value(), b"".join(chunks))

    def test_fullBufferStopsReading(self) -> None:
        """A peer that does not read makes the server stop reading from it, and
        reading starts again when the peer catches up."""
        protocol, transport = connectedEcho()
        self.assertTrue(transport.streaming)
        self.assertEqual(transport.producerState, "producing")
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_countsBytesAndConnections(self) -> None:
        """The server counts live connections and, once one closes, the bytes it echoed."""
        protocol, transport = connectedEcho()
        self.assertEqual(protocol.factory.connections, 1)
        self.assertEqual(protocol.peer, "127.0.0.1:5555")
        protocol.dataReceived(b"abc")
        protocol.connectionLost(None)
        self.assertEqual(protocol.factory.connections, 0)
        self.assertEqual(protocol.factory.echoed, 3)


class FakeUDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class UDPEchoTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = UDPEcho(rate=2, burst=2, clock=self.clock.seconds)
        self.transport = FakeUDPTransport()
        self.proto.transport = self.transport  # type: ignore[assignment]

    def test_echoesDatagram(self) -> None:
        """A UDP datagram, NUL and 0xff bytes included, is sent straight back to its sender."""
        self.proto.datagramReceived(b"\x00hello\xff", ("127.0.0.1", 40000))
        self.assertEqual(self.transport.sent, [(b"\x00hello\xff", ("127.0.0.1", 40000))])

    def test_ignoresServicePorts(self) -> None:
        """Datagrams from echo (7), chargen (19) or any port below 1024 are not answered:
        answering them would start a loop between two servers."""
        for port in (7, 19, 53, 123, 1023):
            self.proto.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(self.transport.sent, [])
        self.assertEqual(self.proto.droppedPort, 5)

    def test_rateLimitPerSource(self) -> None:
        """A source over its rate loses the excess, others are unaffected, and it is answered again a second later."""
        for _ in range(5):
            self.proto.datagramReceived(b"x", ("10.0.0.1", 40000))
        self.proto.datagramReceived(b"y", ("10.0.0.2", 40000))
        self.assertEqual(len(self.transport.sent), 3)
        self.assertEqual(self.proto.droppedRate, 3)
        self.clock.advance(1)
        self.proto.datagramReceived(b"z", ("10.0.0.1", 40000))
        self.assertEqual(self.transport.sent[-1], (b"z", ("10.0.0.1", 40000)))

    def test_limiterTableIsBounded(self) -> None:
        """A thousand different sources never make the rate limiter remember more than its maximum."""
        limiter = RateLimiter(1, 1, self.clock.seconds, maxKeys=100)
        for i in range(1000):
            limiter.allow(i)
        self.assertEqual(len(limiter), 100)


class OptionsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """With no options the echo server listens on TCP port 7000."""
        options = echotap.Options()
        options.parseOptions([])
        self.assertEqual(options["port"], 7000)
        self.assertEqual(options.endpointDescriptions()[0].split(":backlog=")[0], "tcp:7000")

    def test_interfaceIsEscaped(self) -> None:
        """--interface ::1 is escaped into the endpoint description, so an IPv6 address works."""
        options = echotap.Options()
        options.parseOptions(["--port", "7100", "--interface", "::1"])
        self.assertTrue(options.endpointDescriptions()[0].startswith("tcp:7100:interface=\\:\\:1"))

    def test_listenRepeatable(self) -> None:
        """--listen may be given more than once, one listening endpoint each."""
        options = echotap.Options()
        options.parseOptions(["--listen", "tcp6:7000", "--listen", "unix:/tmp/x.sock"])
        descriptions = options.endpointDescriptions()
        self.assertEqual(len(descriptions), 2)
        self.assertIn("backlog=", descriptions[0])
        self.assertEqual(descriptions[1], "unix:/tmp/x.sock")

    def test_badValuesAreOneLineErrors(self) -> None:
        """A bad port, endpoint, rate or combination of options is a one-line usage error."""
        for argv in (["--port", "x"], ["--port", "70000"], ["--listen", "bogus:1"], ["--udp-rate", "-1"],
                     ["--listen", "tcp:1", "--port", "2"], ["--udp", "--listen", "unix:/tmp/echo.sock"]):
            options = echotap.Options()
            error = self.assertRaises(usage.UsageError, options.parseOptions, argv)
            self.assertNotIn("\n", str(error))

    def test_backlogKeptWhenGiven(self) -> None:
        """A backlog given in --listen is kept; a TCP listen without one gets the default, a UNIX one none."""
        self.assertEqual(withBacklog("tcp:1:backlog=5", 1024), "tcp:1:backlog=5")
        self.assertEqual(withBacklog("7000", 1024), "7000:backlog=1024")
        self.assertEqual(withBacklog("unix:/x", 1024), "unix:/x")


class LoopbackTests(unittest.TestCase):
    """The service as twistd builds it, over real loopback sockets."""

    def startServer(self, *argv: str) -> echotap.EchoService:
        options = echotap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", *argv])
        service = echotap.makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def test_tcpEchoOverLoopback(self):  # type: ignore[no-untyped-def]
        """256 KiB sent over a real loopback connection come back byte for byte."""
        service = self.startServer()
        port = service.tcp.ports[0].getHost().port
        received = bytearray()
        gotAll: defer.Deferred[None] = defer.Deferred()
        payload = bytes(range(256)) * 1024

        class Client(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(payload)

            def dataReceived(self, data: bytes) -> None:
                received.extend(data)
                if len(received) >= len(payload):
                    self.transport.loseConnection()
                    gotAll.callback(None)

        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Client))
        yield gotAll
        self.assertEqual(bytes(received), payload)

    def test_udpOnSamePortNumber(self) -> None:
        """With --udp the server answers datagrams on the same port number as its TCP port."""
        service = self.startServer("--udp")
        port = service.tcp.ports[0].getHost().port
        self.assertEqual(service.udpPort.getHost().port, port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(b"ping\x00", ("127.0.0.1", port))
        d: defer.Deferred[bytes] = defer.Deferred()

        def poll(tries: int = 200) -> None:
            try:
                d.callback(sock.recv(100, socket.MSG_DONTWAIT))
            except BlockingIOError:
                if tries:
                    reactor.callLater(0.01, poll, tries - 1)
                else:
                    d.errback(AssertionError("no UDP echo within 2 s"))

        poll()
        return d.addCallback(self.assertEqual, b"ping\x00")

    def test_udpPortInUseIsOneLine(self) -> None:
        """A UDP port already taken stops the server with one line, and the TCP port it opened is closed again."""
        for _ in range(20):  # a UDP port whose TCP twin is free, so the UDP listen is what fails
            taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(taken.close)
            taken.bind(("127.0.0.1", 0))
            with socket.socket() as twin:
                try:
                    twin.bind(taken.getsockname())
                    break
                except OSError:
                    continue
        options = echotap.Options()
        options.parseOptions(["--port", str(taken.getsockname()[1]), "--interface", "127.0.0.1", "--udp"])
        service = echotap.makeService(options)
        error = self.assertRaises(CannotListen, service.startService)
        self.assertIn("cannot listen for UDP on 127.0.0.1:", str(error))
        self.assertNotIn("\n", str(error))
        self.assertEqual(service.tcp.ports, [], "the TCP port is closed again")

    def test_portInUseIsOneLine(self) -> None:
        """A TCP port already in use stops the server with one line saying so."""
        service = self.startServer()
        port = service.tcp.ports[0].getHost().port
        options = echotap.Options()
        options.parseOptions(["--port", str(port), "--interface", "127.0.0.1"])
        error = self.assertRaises(CannotListen, echotap.makeService(options).startService)
        self.assertIn("cannot listen on", str(error))
        self.assertIn("in use", str(error))
        self.assertNotIn("\n", str(error))


class PeerNameTests(unittest.TestCase):
    def test_unixPathIsEscaped(self) -> None:
        """A client picks the path of its own UNIX socket: it must not reach a log raw."""
        self.assertEqual(describeAddress(UNIXAddress(b"/tmp/\x1b[2Jx\n")), "unix:/tmp/\\x1b[2Jx\\x0a")
        self.assertEqual(describeAddress(UNIXAddress(None)), "unix")
        self.assertEqual(describeAddress(IPv4Address("TCP", "127.0.0.1", 5)), "127.0.0.1:5")
