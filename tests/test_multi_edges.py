"""tcplab-multi at the edges real clients reach: half-close (``nc -N``, ``shutdown(SHUT_WR)``), an
unterminated last line, TLS connections that never finish their handshake, and ``--max-line`` to the byte."""

from __future__ import annotations

import re
import select
import shutil
import socket
import subprocess
import time

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import directlyProvides

from tcplab.multi import tap as multitap
from tests.support import ServerProcess, scratch
from tests.test_backplane import Cluster, RedisMixin, connectTo
from tests.test_multi import FlowTransport, Room
from tests.tlsutil import makeCertificates

WELCOME = b"* welcome"


def halfClose(client: object) -> None:
    """What Twisted does when the peer shuts down its sending side."""
    client.readConnectionLost()  # type: ignore[attr-defined]


class HalfCloseTests(unittest.TestCase):
    def test_halfCloseGetsEveryEchoAndReplyBeforeTheClose(self) -> None:
        """Lines and a /who sent before a half-close all come back, then the server closes."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        self.assertTrue(IHalfCloseableProtocol.providedBy(a))
        a.dataReceived(b"one\ntwo\n/who\nthree\n")
        halfClose(a)
        self.assertEqual(ta.take(), b"one\ntwo\n/who\n* 2 connected: 127.0.0.1:40001, 127.0.0.1:40002\nthree\n")
        self.assertTrue(ta.disconnecting)
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> one\n<127.0.0.1:40001> two\n<127.0.0.1:40001> three\n"
                                    b"* 127.0.0.1:40001 left\n")

    def test_halfCloseFlushesWhatWaitsInTheQueue(self) -> None:
        """A client whose echoes the server could not send yet still gets every one of them."""
        room = Room(bufferSize=10)
        a, ta = room.connect()
        _, tb = room.connect(bufferSize=1 << 30)
        data = b"".join(b"line %d\n" % i for i in range(200))
        for i in range(0, len(data), 7):
            a.dataReceived(data[i:i + 7])
        self.assertLess(len(ta.value()), len(data), "the test needs echoes still queued")
        halfClose(a)
        self.assertEqual(ta.take(), b"* 127.0.0.1:40002 joined\n" + data)
        self.assertTrue(ta.disconnecting)
        self.assertEqual(tb.take().count(b"\n"), 201)

    def test_othersKeepGettingLines(self) -> None:
        """After one client half-closes and goes, the others still talk to each other."""
        room = Room()
        a, _ = room.connect()
        b, tb = room.connect()
        _, tc = room.connect()
        halfClose(a)
        room.takeAll()
        b.dataReceived(b"still here\n")
        self.assertEqual(tc.take(), b"<127.0.0.1:40002> still here\n")
        self.assertEqual(tb.take(), b"still here\n")

    def test_halfCloseOverTheBackplane(self) -> None:
        """Lines sent before a half-close, the unterminated last one too, reach the other hubs' clients."""
        cluster = Cluster()
        a, ta = cluster.connect(0)
        _, tb = cluster.connect(1)
        cluster.takeAll()
        a.dataReceived(b"a\nb\nlast")
        halfClose(a)
        cluster.settle()
        self.assertEqual(ta.take(), b"a\nb\nlast")
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> a\n<127.0.0.1:40001> b\n<127.0.0.1:40001> last\n"
                                    b"* 127.0.0.1:40001 left\n")


class LastLineTests(unittest.TestCase):
    def test_unterminatedLastLineIsDelivered(self) -> None:
        """``printf 'last words' | nc -N``: the others get the line, the sender gets it back as sent."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"first\nlast ")
        a.dataReceived(b"words")
        halfClose(a)
        self.assertEqual(ta.take(), b"first\nlast words")
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> first\n<127.0.0.1:40001> last words\n"
                                    b"* 127.0.0.1:40001 left\n")
        self.assertEqual(room.hub.stats.lines, 2)

    def test_unterminatedCommandIsRun(self) -> None:
        """A last line that is a command gets its reply."""
        room = Room()
        a, ta = room.connect()
        a.dataReceived(b"/who")
        halfClose(a)
        self.assertEqual(ta.take(), b"/who* 1 connected: 127.0.0.1:40001\n")

    def test_finalCarriageReturnIsALineEnd(self) -> None:
        """A last line ending in ``\\r`` (half a CRLF) counts it as its line end, as complete lines do."""
        room = Room(maxLine=4)
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"abcd\r")
        halfClose(a)
        self.assertEqual(ta.take(), b"abcd\r")
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> abcd\n* 127.0.0.1:40001 left\n")

    def test_cleanCloseDeliversTheLastLineToOthers(self) -> None:
        """A clean close with no half-close first (as over TLS) still gives the others the last line."""
        room = Room()
        a, _ = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"bye all")
        a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> bye all\n* 127.0.0.1:40001 left\n")

    def test_brokenConnectionDeliversNoHalfLine(self) -> None:
        """A connection that breaks (reset) did not end its input: its unfinished line is dropped."""
        room = Room()
        a, _ = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"half a li")
        a.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(tb.take(), b"* 127.0.0.1:40001 left\n")

    def test_maxLineStillAppliesToTheLastLine(self) -> None:
        """An unterminated last line longer than --max-line is refused as it arrives, never delivered."""
        room = Room(maxLine=5)
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"123456")
        halfClose(a)
        self.assertIn(b"line too long", ta.take())
        self.assertEqual(tb.take(), b"* 127.0.0.1:40001 left (line too long)\n")


class MaxLineExactTests(unittest.TestCase):
    """``--max-line`` to the byte, whole or in fragments of every size."""

    LIMIT = 10

    def feed(self, data: bytes, size: int) -> tuple[FlowTransport, FlowTransport]:
        room = Room(maxLine=self.LIMIT)
        a, ta = room.connect()
        _, tb = room.connect()
        for i in range(0, len(data), size):
            a.dataReceived(data[i:i + size])
        return ta, tb

    def test_exactlyMaxLinePasses(self) -> None:
        """A line of exactly --max-line bytes is held, then delivered, in fragments of every size."""
        line = b"x" * self.LIMIT
        for size in range(1, 2 * self.LIMIT + 3):
            for data in (line, b"ok\n" + line, line + b"\r"):
                ta, tb = self.feed(data, size)
                self.assertFalse(ta.disconnecting, (data, size))
                self.assertNotIn(b"too long", ta.value() + tb.value())

    def test_oneByteMoreIsRefused(self) -> None:
        """One byte over --max-line, unterminated and not a ``\\r``, is refused at once, also as the tail of a
        read after a complete line, in fragments of every size."""
        for size in range(1, 2 * self.LIMIT + 6):
            for data in (b"x" * (self.LIMIT + 1), b"ok\n" + b"x" * (self.LIMIT + 1), b"x" * self.LIMIT + b"\ry"):
                ta, tb = self.feed(data, size)
                self.assertTrue(ta.disconnecting, (data, size))
                self.assertIn(b"* line too long: the limit is 10 bytes", ta.value(), (data, size))
                self.assertTrue(tb.value().endswith(b"left (line too long)\n"), (data, size))

    def test_oneByteMoreTerminatedIsRefused(self) -> None:
        """A complete line of --max-line + 1 bytes is refused; others never see it."""
        ta, tb = self.feed(b"x" * (self.LIMIT + 1) + b"\n", 100)
        self.assertTrue(ta.disconnecting)
        self.assertNotIn(b"xxxxxxxxxxx", tb.value())


class HandshakeTests(unittest.TestCase):
    def connectTLS(self, room: Room) -> tuple[object, FlowTransport]:
        room.nextPort += 1
        address = IPv4Address("TCP", "127.0.0.1", room.nextPort)
        client = room.hub.buildProtocol(address)
        transport = FlowTransport(address)
        directlyProvides(transport, ISSLTransport)
        client.makeConnection(transport)
        return client, transport

    def test_noHandshakeNoNotice(self) -> None:
        """A TLS connection that never finishes its handshake is never announced, joining or leaving."""
        room = Room()
        _, tb = room.connect()
        with capturedLogs() as events:
            c, tc = self.connectTLS(room)
            self.assertEqual((tb.value(), tc.value()), (b"", b""))
            self.assertNotIn(c, room.hub.members)
            c.connectionLost(Failure(ConnectionLost()))  # type: ignore[attr-defined]
        self.assertEqual(tb.value(), b"")
        self.assertEqual([e for e in events if "joined" in e.get("log_format", "")], [])
        self.assertEqual(room.hub.connections, 1)

    def test_joinAfterTheHandshake(self) -> None:
        """Once its handshake is done, a TLS client is welcomed and the room told."""
        room = Room()
        _, tb = room.connect()
        c, tc = self.connectTLS(room)
        c.handshakeCompleted()  # type: ignore[attr-defined]
        self.assertTrue(tc.value().startswith(WELCOME))
        self.assertEqual(tb.take(), b"* 127.0.0.1:40002 joined\n")

    def test_stopAbortsPendingHandshakes(self) -> None:
        """A stopping server does not wait for handshakes that may never finish."""
        room = Room()
        c, tc = self.connectTLS(room)
        d = room.hub.shutdown()
        self.assertTrue(tc.disconnecting)
        self.assertNoResult(d)
        c.connectionLost(Failure(ConnectionLost()))  # type: ignore[attr-defined]
        self.successResultOf(d)


class Collector(Protocol):
    """Collects everything; ``lost`` fires when the server closes."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


def halfCloseExchange(port: int, data: bytes, rcvbuf: int | None = None, seconds: float = 10.0) -> bytes:
    """Send ``data`` while reading, ``shutdown(SHUT_WR)``, and read until the server closes (a blocking
    client for a thread, with an optional small receive window)."""
    deadline = time.monotonic() + seconds
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        got = bytearray()
        view = memoryview(data)
        shut = False
        while time.monotonic() < deadline:
            if not view and not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            readable, writable, _ = select.select([sock], [sock] if view else [], [], 0.5)
            if writable:
                view = view[sock.send(view[:65536]):]
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    return bytes(got)
                got += chunk
        raise AssertionError(f"the server did not close within {seconds}s ({len(got)} bytes read)")
    finally:
        sock.close()


class LoopbackHalfCloseTests(unittest.TestCase):
    """A real hub on loopback, real half-closing clients."""

    timeout = 30

    def startServer(self, *argv: str) -> int:
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0", *argv])
        service = multitap.HubService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service.listening.ports[0].getHost().port  # type: ignore[no-any-return]

    async def test_shutWrGetsEveryEcho(self) -> None:
        """``one\\ntwo\\nthree\\n`` then ``shutdown(SHUT_WR)``: all three come back, 20 times of 20."""
        port = self.startServer()
        for _ in range(20):
            got = await threads.deferToThread(halfCloseExchange, port, b"one\ntwo\nthree\n")
            self.assertTrue(got.startswith(WELCOME), got)
            self.assertTrue(got.endswith(b"\none\ntwo\nthree\n"), got)

    async def test_smallReceiveWindowGetsEveryByte(self) -> None:
        """A client with a 4 KiB receive window and 536-byte segments gets all of a 64 KiB echo back."""
        port = self.startServer()
        data = b"".join(b"%05d %s\n" % (i, b"y" * 58) for i in range(1024))
        got = await threads.deferToThread(halfCloseExchange, port, data, 4096)
        self.assertEqual(got[got.index(b"\n") + 1:], data)

    async def test_unterminatedLastLineOverLoopback(self) -> None:
        """``printf 'last words' | nc -N``: a listener gets the line; the sender gets it back."""
        port = self.startServer()
        listener = Collector()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: listener))
        got = await threads.deferToThread(halfCloseExchange, port, b"last words")
        self.assertTrue(got.endswith(b"\nlast words"), got)
        deadline = time.monotonic() + 10
        while not listener.data.endswith(b" left\n"):
            self.assertLess(time.monotonic(), deadline, listener.data)
            await _later(0.02)
        self.assertIn(b"> last words\n", listener.data)
        listener.transport.loseConnection()
        await listener.lost

    async def test_backplaneHalfClose(self) -> None:
        """Over a real Redis backplane, a client on the other hub gets every line sent before the half-close."""
        redis = RedisMixin()
        redis.addCleanup = self.addCleanup  # type: ignore[method-assign]
        redis.setUp()
        a, b = redis.startNode(), redis.startNode()
        await defer.gatherResults([a.backplane.whenUp(), b.backplane.whenUp()])  # type: ignore[union-attr]
        listener = await connectTo(b.listening.ports[0].getHost().port)
        port = a.listening.ports[0].getHost().port
        got = await threads.deferToThread(halfCloseExchange, port, b"a\nb\nlast")
        # Server lines (the welcome, the listener's join crossing Redis) may come between the echoes.
        self.assertTrue(re.sub(rb"\* [^\n]*(\n|$)", b"", got).endswith(b"a\nb\nlast"), got)
        await listener.waitFor(lambda c: any(line.endswith(b" left") for line in c.lines))
        chat = [line.split(b"> ", 1)[1] for line in listener.lines if line.startswith(b"<")]
        self.assertEqual(chat, [b"a", b"b", b"last"])
        listener.transport.loseConnection()
        await listener.lost


class TLSHandshakeLoopbackTests(unittest.TestCase):
    timeout = 30

    async def test_plainClientOnTLSPortIsNeverAnnounced(self) -> None:
        """A plain ``nc`` hitting an ``ssl:`` port is turned away without the room hearing of it."""
        certs = makeCertificates(scratch(self))
        options = multitap.Options()
        options.parseOptions(["--listen", f"ssl:0:privateKey={certs['server']}:interface=127.0.0.1",
                              "--stats-interval", "0"])
        service = multitap.HubService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.listening.ports[0].getHost().port
        with open(certs["ca"], "rb") as f:
            trust = Certificate.loadPEM(f.read())

        async def tlsClient() -> Collector:
            client = Collector()
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=trust),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", port))
            await endpoint.connect(Factory.forProtocol(lambda: client))
            return client

        listener = await tlsClient()
        plain = Collector()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: plain))
        plain.transport.write(b"hello, this is not TLS\n")
        await plain.lost.addTimeout(10, reactor)
        marker = await tlsClient()
        deadline = time.monotonic() + 10
        markerName = f"127.0.0.1:{marker.transport.getHost().port}".encode()
        while b"* " + markerName + b" joined" not in listener.data:
            self.assertLess(time.monotonic(), deadline, listener.data)
            await _later(0.02)
        notices = [line for line in listener.data.split(b"\n") if line.startswith(b"* ") and b"welcome" not in line]
        self.assertEqual(notices, [b"* " + markerName + b" joined"])
        for c in (listener, marker):
            c.transport.loseConnection()
            await c.lost


def _later(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class ThirdPartyClientTests(unittest.TestCase):
    """``printf 'x\\n' | nc -N`` and ``| ncat`` against a real ``twistd tcplab-multi``: 100 of 100 get their echo."""

    timeout = 60
    RUNS = 100

    def setUp(self) -> None:
        self.server = ServerProcess("tcplab-multi", "--port", "0", "--interface", "127.0.0.1", "--stats-interval",
                                    "0")
        self.addCleanup(self.server.stop)

    def runTool(self, argv: list[str], data: bytes) -> bytes:
        return subprocess.run(argv, input=data, capture_output=True, timeout=5).stdout

    def everyRun(self, argv: list[str]) -> None:
        missed = []
        for i in range(self.RUNS):
            out = self.runTool(argv, b"x\n")
            if not out.endswith(b"\nx\n"):
                missed.append((i, out))
        self.assertEqual(missed, [], f"{len(missed)} of {self.RUNS} runs lost their echo")

    def test_ncHalfClose(self) -> None:
        """``printf 'x\\n' | nc -N 127.0.0.1 P`` prints its echo, 100 runs of 100."""
        if shutil.which("nc") is None:
            raise unittest.SkipTest("nc (OpenBSD netcat, with -N) is not installed")
        self.everyRun(["nc", "-N", "127.0.0.1", str(self.server.port)])

    def test_ncat(self) -> None:
        """``printf 'x\\n' | ncat 127.0.0.1 P`` prints its echo, 100 runs of 100."""
        if shutil.which("ncat") is None:
            raise unittest.SkipTest("ncat is not installed")
        self.everyRun(["ncat", "127.0.0.1", str(self.server.port)])

    def test_whoReply(self) -> None:
        """``printf '/who\\n' | nc -N`` prints the reply; ``printf 'a\\nb\\n'`` prints a and b."""
        if shutil.which("nc") is None:
            raise unittest.SkipTest("nc (OpenBSD netcat, with -N) is not installed")
        nc = ["nc", "-N", "127.0.0.1", str(self.server.port)]
        out = self.runTool(nc, b"/who\n")
        self.assertRegex(out, rb"\n/who\n\* 1 connected: 127\.0\.0\.1:\d+\n\Z")
        self.assertTrue(self.runTool(nc, b"a\nb\n").endswith(b"\na\nb\n"))
        self.assertTrue(self.runTool(nc, b"last words").endswith(b"\nlast words"))

