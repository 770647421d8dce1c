"""The per-connection fast paths (issue 15) keep what users see: every connection logged, every byte in order."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from tcplab.echo.server import ConnectionLog, Echo, EchoFactory
from tcplab.flow import TurnWrites, WriteTurns
from tcplab.multi.hub import HubClient, HubConfig, MultiHub
from tests.test_multi import FlowTransport


class TurnClock(Clock):
    """A Clock with the reactor's ``callFromThread``: what is queued runs when the test ends the turn."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[object] = []

    def callFromThread(self, f, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.queued.append((f, args, kwargs))

    def endTurn(self) -> None:
        queued, self.queued = self.queued, []
        for f, args, kwargs in queued:  # type: ignore[misc]
            f(*args, **kwargs)


class ConnectionLogTests(unittest.TestCase):
    def test_aBusyTurnIsOneEventWithEveryLine(self) -> None:
        """Three connections coming and going in one turn are logged as one event naming each of them."""
        clock = TurnClock()
        connections = ConnectionLog(clock)
        with capturedLogs() as events:
            connections.add("connection from {peer}", {"peer": "127.0.0.1:1"})
            connections.add("connection from {peer}", {"peer": "127.0.0.1:2"})
            connections.add("{peer} disconnected, {echoed} bytes echoed", {"peer": "127.0.0.1:1", "echoed": 6})
            self.assertEqual(events, [], "nothing is formatted before the turn ends")
            clock.endTurn()
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["lines"].splitlines(), [
            "connection from 127.0.0.1:1", "connection from 127.0.0.1:2", "127.0.0.1:1 disconnected, 6 bytes echoed"])

    def test_aLoneLineIsLoggedAsItAlwaysWas(self) -> None:
        """A quiet server's log is unchanged: one event per connection line, with its format and fields."""
        clock = TurnClock()
        connections = ConnectionLog(clock)
        with capturedLogs() as events:
            connections.add("connection from {peer}", {"peer": "127.0.0.1:1"})
            clock.endTurn()
        self.assertEqual([(e["log_format"], e["peer"]) for e in events], [("connection from {peer}", "127.0.0.1:1")])

    def test_stoppingServerLogsWhatIsPending(self) -> None:
        """A server stopping in the same turn as a connection still logs it."""
        factory = EchoFactory(clock=TurnClock())
        with capturedLogs() as events:
            factory.log.add("connection from {peer}", {"peer": "127.0.0.1:1"})
            factory.stopFactory()
        self.assertEqual([e["peer"] for e in events], ["127.0.0.1:1"])


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class TurnWritesTests(unittest.TestCase):
    def test_aTurnsWritesAreOneTransportWrite(self) -> None:
        """Everything written to a client in one turn reaches its transport as one write, in order."""
        clock = TurnClock()
        transport = FakeTransport()
        writes = TurnWrites(transport, WriteTurns(clock))  # type: ignore[arg-type]
        for line in (b"a\n", b"b\n", b"c\n"):
            writes.write(line)
        self.assertEqual(transport.writes, [])
        clock.endTurn()
        self.assertEqual(transport.writes, [b"a\nb\nc\n"])

    def test_largeWritesGoAtOnce(self) -> None:
        """Past FLUSH_AT bytes the transport gets them at once, so its buffer pauses a producer as soon as before."""
        transport = FakeTransport()
        writes = TurnWrites(transport, WriteTurns(TurnClock()))  # type: ignore[arg-type]
        writes.write(b"x" * (TurnWrites.FLUSH_AT - 1))
        self.assertEqual(transport.writes, [])
        writes.write(b"y")
        self.assertEqual(transport.writes, [b"x" * (TurnWrites.FLUSH_AT - 1) + b"y"])

    def test_testClocksAndNonSocketsWriteDirectly(self) -> None:
        """Without a reactor, or for a transport that is not a plain socket, the transport itself is used."""
        transport = FakeTransport()
        self.assertIs(WriteTurns(Clock()).writesFor(transport), transport)  # type: ignore[arg-type]
        self.assertIs(WriteTurns(TurnClock()).writesFor(transport), transport)  # type: ignore[arg-type]

    def test_hubClosingSendsTheTurnsLinesBeforeBye(self) -> None:
        """A client quitting right after another's line gets that line before its "* bye", not after."""
        clock = TurnClock()
        hub = MultiHub(HubConfig(noticeLimit=0), clock)  # type: ignore[arg-type]
        hub.writeTurns.writesFor = lambda transport: TurnWrites(transport, hub.writeTurns)  # type: ignore[method-assign]
        clients = []
        for port in (40001, 40002):
            address = IPv4Address("TCP", "127.0.0.1", port)
            client = hub.buildProtocol(address)
            transport = FlowTransport(address)
            client.makeConnection(transport)
            clients.append((client, transport))
        clock.endTurn()
        (a, _), (b, tb) = clients
        tb.take()
        a.dataReceived(b"hello\n")
        b.dataReceived(b"/quit\n")
        clock.endTurn()
        self.assertEqual(tb.value(), b"<127.0.0.1:40001> hello\n/quit\n* bye\n")


class Recorded(Echo):
    """Notes whether the connection was closed by the time readConnectionLost returned."""

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.factory.closedAtOnce.callback(bool(self.transport.disconnected))  # type: ignore[attr-defined]


class EchoHalfCloseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_halfCloseWithNothingOwedClosesAtOnce(self):  # type: ignore[no-untyped-def]
        """A client that half-closes after reading its echo gets the close in that same turn, and its bytes."""
        factory = EchoFactory(clock=reactor)
        factory.protocol = Recorded
        factory.closedAtOnce = defer.Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        sock.sendall(b"ping\n")
        got = b""
        for _ in range(500):  # at most 5 s
            if len(got) >= 5:
                break
            yield deferLater(0.01)
            try:
                got += sock.recv(100)
            except BlockingIOError:
                pass
        sock.shutdown(socket.SHUT_WR)
        closedAtOnce = yield factory.closedAtOnce  # type: ignore[attr-defined]
        self.assertTrue(closedAtOnce)
        self.assertEqual(got, b"ping\n")
        yield deferLater(0)
        self.assertEqual(factory.echoed, 5)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class RecordedClient(HubClient):
    """Notes whether the connection was closed, with no grace timer, by the time readConnectionLost returned."""

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.factory.closedAtOnce.callback(  # type: ignore[attr-defined]
            bool(self.transport.disconnected) and self._abort is None)  # type: ignore[attr-defined]


class HubHalfCloseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_halfCloseWithNothingOwedClosesAtOnce(self):  # type: ignore[no-untyped-def]
        """A hub client that half-closes after its last line gets that line's echo, then the close in the same turn."""
        hub = MultiHub(HubConfig(), clock=reactor)
        hub.protocol = RecordedClient
        hub.closedAtOnce = defer.Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, hub, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        sock.sendall(b"last words")  # no line end: the half-close ends the line
        sock.shutdown(socket.SHUT_WR)
        closedAtOnce = yield hub.closedAtOnce  # type: ignore[attr-defined]
        self.assertTrue(closedAtOnce)
        got = b""
        for _ in range(500):  # at most 5 s
            yield deferLater(0.01)
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
        self.assertTrue(got.startswith(b"* welcome, you are 127.0.0.1:"), got)
        self.assertTrue(got.endswith(b"\nlast words"), got)
        self.assertEqual(hub.connections, 0)
