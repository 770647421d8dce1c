"""Slow-loris and idle clients: each server cuts off a client that trickles a request (or nothing)
after a configurable time, and serves everyone else promptly meanwhile.

First tcplab-echo's --idle-timeout on a fake clock, then many trickling clients over loopback
against tcplab-file (--header-timeout) and tcplab-multi (--idle-timeout, --max-line).
(The clock-driven tests of those two are in test_fileserver.py and test_multi.py.)
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.echo import tap as echotap
from tcplab.echo.server import CLOSE_GRACE, Echo, EchoFactory, TimedEcho
from tcplab.file import tap as filetap
from tcplab.file.sender import Uploader, UploadProtocol
from tcplab.multi import tap as multitap
from tests.test_send import scratch

#: How many trickling clients, and the limit on how long any loopback test waits for anything.
TRICKLERS = 50
DEADLINE = 10.0


class EchoIdleTimeoutTests(unittest.SynchronousTestCase):
    def connect(self, factory: EchoFactory) -> tuple[Echo, StringTransport]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_idleConnectionClosed(self) -> None:
        """An echo connection silent for --idle-timeout is closed cleanly, echoes nothing more, is aborted if it does
        not go within the grace, and leaves no timer behind."""
        clock = Clock()
        factory = EchoFactory(idleTimeout=10, clock=clock)
        protocol, transport = self.connect(factory)
        clock.advance(9.9)
        protocol.dataReceived(b"still here\n")
        clock.advance(9.9)
        self.assertFalse(transport.disconnecting, "each byte received starts the time again")
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "a clean close first")
        self.assertEqual(factory.timedOut, 1)
        protocol.dataReceived(b"too late\n")
        self.assertEqual(transport.value(), b"still here\n", "nothing more is echoed once closing")
        clock.advance(CLOSE_GRACE)
        self.assertTrue(transport.disconnected, "aborted if it does not take the close")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((factory.connections, clock.getDelayedCalls()), (0, []))

    def test_notReadingIsIdleToo(self) -> None:
        """A client that sent a lot and reads nothing back holds the connection without doing anything;
        reading some of what it is owed counts as progress."""
        clock = Clock()
        protocol, transport = self.connect(EchoFactory(idleTimeout=10, clock=clock))
        protocol.dataReceived(b"x" * 1000)
        transport.producer.pauseProducing()  # its socket buffer is full: the server stops reading from it
        clock.advance(9)
        transport.producer.resumeProducing()  # it read what it was owed
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        transport.producer.pauseProducing()
        clock.advance(1.5)
        self.assertTrue(transport.disconnecting)

    def test_offByDefault(self) -> None:
        """Without --idle-timeout the echo path is the plain one, with no timer at all."""
        clock = Clock()
        factory = EchoFactory(clock=clock)
        protocol, transport = self.connect(factory)
        self.assertIs(type(protocol), Echo)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(1e9)
        self.assertFalse(transport.disconnecting)
        self.assertIs(type(EchoFactory(idleTimeout=1, clock=clock).buildProtocol(None)), TimedEcho)

    def test_twistdOption(self) -> None:
        """The echo server's --idle-timeout is off by default, cuts a silent client after the given seconds, and bad
        values are one-line errors naming the option."""
        options = echotap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1"])
        self.assertEqual(options["idle-timeout"], 0)
        options = echotap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--idle-timeout", "2.5"])
        clock = MemoryReactorClock()
        service = echotap.EchoService(options, clock)
        service.startService()
        self.addCleanup(service.stopService)
        protocol, transport = self.connect(service.factory)
        clock.advance(2.4)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        for value in ("-1", "soon"):
            error = self.assertRaises(usage.UsageError, echotap.Options().parseOptions, ["--idle-timeout", value])
            self.assertIn("--idle-timeout", str(error))
            self.assertNotIn("\n", str(error))


class Trickler(Protocol):
    """Sends ``script`` one byte every ``interval`` seconds (then nothing), and notes what it hears
    and when the server cut it off."""

    def __init__(self, script: bytes, interval: float) -> None:
        self.script = script
        self.interval = interval
        self.received = b""
        self.connectedAt = 0.0
        self.cutAfter: float | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._next: Any = None

    def connectionMade(self) -> None:
        self.connectedAt = time.monotonic()
        self._send(0)

    def _send(self, i: int) -> None:
        self._next = None
        if i < len(self.script):
            self.transport.write(self.script[i:i + 1])
            self._next = reactor.callLater(self.interval, self._send, i + 1)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.cutAfter = time.monotonic() - self.connectedAt
        if self._next is not None and self._next.active():
            self._next.cancel()
        self.lost.callback(None)


class LoopbackCase(unittest.TestCase):
    timeout = 30

    async def trickle(self, port: int, scripts: list[tuple[bytes, float]]) -> list[Trickler]:
        """Connect one trickler per script; each is aborted at the end of the test if still there."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        tricklers = [Trickler(script, interval) for script, interval in scripts]
        await defer.gatherResults([endpoint.connect(Factory.forProtocol(lambda t=t: t)) for t in tricklers])
        for t in tricklers:
            self.addCleanup(lambda t=t: None if t.lost.called else (t.transport.abortConnection(), t.lost)[1])
        return tricklers

    async def allCut(self, tricklers: list[Trickler]) -> None:
        await defer.gatherResults([t.lost for t in tricklers]).addTimeout(DEADLINE, reactor)


class FileTricklerTests(LoopbackCase):
    async def test_headersTrickledAreCutOffWhileAnUploadGoesThrough(self) -> None:
        """Many clients trickling a header byte by byte are each cut off with one timeout line after --header-
        timeout, while a normal upload goes through alongside them."""
        folder, src = scratch(self), scratch(self)
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", folder, "--header-timeout", "1",
                              "--max-per-peer", "0"])
        service = filetap.FileService(options)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.tcp.ports[0].getHost().port
        # The line would take 3 s at this pace: about 10 bytes of it are in when the second is up.
        tricklers = await self.trickle(port, [(b"PUT 5 a-slowly-sent-name.txt\n", 0.1)] * TRICKLERS)
        data = os.urandom(2 << 20)
        path = os.path.join(src, "normal.bin")
        with open(path, "wb") as f:
            f.write(data)

        def connect() -> defer.Deferred[Any]:
            client = UploadProtocol(reactor, 10)
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect)
        sent = await uploader.send(path, "normal.bin")
        await uploader.close()
        self.assertEqual(sent.stored, "received_normal.bin")
        self.assertEqual([t for t in tricklers if t.lost.called], [], "and went through while they were all there")

        await self.allCut(tricklers)
        for t in tricklers:
            self.assertTrue(t.received.startswith(b"ERR timeout no complete request line within 1s"), t.received)
            self.assertEqual(t.received.count(b"\n"), 1)
            assert t.cutAfter is not None
            self.assertGreater(t.cutAfter, 0.9)
        self.assertEqual(sorted(os.listdir(folder)), ["received_normal.bin"])
        for _ in range(200):
            if not service.factory.connections:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(service.factory.connections, 0)


class MultiTricklerTests(LoopbackCase):
    async def test_lineTricklersAreCutOffWhileOthersChat(self) -> None:
        """Half stall after a few bytes (--idle-timeout cuts them), half trickle an endless line
        faster than the idle timeout (--max-line cuts them); a normal client chats throughout."""
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--idle-timeout", "1", "--max-line", "32",
                              "--stats-interval", "0", "--notice-limit", "0"])
        service = multitap.HubService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.listening.ports[0].getHost().port
        half = TRICKLERS // 2
        tricklers = await self.trickle(port, [(b"abc", 0.1)] * half + [(b"y" * 40, 0.05)] * half)

        normal = Trickler(b"", 0)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: normal))
        self.addCleanup(lambda: None if normal.lost.called else (normal.transport.abortConnection(), normal.lost)[1])
        chat = task.LoopingCall(normal.transport.write, b"hello\n")
        started = time.monotonic()
        chat.start(0.3)
        self.addCleanup(lambda: chat.stop() if chat.running else None)
        while b"hello\n" not in normal.received:
            self.assertLess(time.monotonic() - started, DEADLINE, "the echo is not held up by the tricklers")
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([t for t in tricklers if t.lost.called], [], "and came while they were all there")

        await self.allCut(tricklers)
        stalled, endless = tricklers[:half], tricklers[half:]
        for t in stalled:
            self.assertTrue(t.received.endswith(b"* idle for 1s (--idle-timeout): disconnecting\n"), t.received)
            assert t.cutAfter is not None
            self.assertGreater(t.cutAfter, 1.2)
        for t in endless:
            tooLong = b"* line too long: the limit is 32 bytes (--max-line); disconnecting\n"
            self.assertTrue(t.received.endswith(tooLong), t.received)
        self.assertFalse(normal.lost.called, "the chatting client is still there")
        self.assertEqual(set(normal.received.split(b"\n")[1:-1]), {b"hello"}, "no trickled fragment reached anyone")
        self.assertEqual(len(service.hub.members), 1)


class EchoIdleLoopbackTests(LoopbackCase):
    async def test_idleCutOffActiveKept(self) -> None:
        """Over loopback an idle echo client is cut off after --idle-timeout while one that keeps sending is kept
        until it stops."""
        options = echotap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--idle-timeout", "0.5"])
        service = echotap.EchoService(options)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.tcp.ports[0].getHost().port
        idle, active = await self.trickle(port, [(b"hi", 0.01), (b"a steady trickle", 0.1)])
        await idle.lost.addTimeout(DEADLINE, reactor)
        self.assertEqual(idle.received, b"hi")
        assert idle.cutAfter is not None
        self.assertGreater(idle.cutAfter, 0.5)
        self.assertFalse(active.lost.called, "a client that keeps sending is not idle")
        await active.lost.addTimeout(DEADLINE, reactor)
        self.assertEqual(active.received, b"a steady trickle")
        assert active.cutAfter is not None
        self.assertGreater(active.cutAfter, 1.5 + 0.5, "cut off only once it stopped")
        self.assertEqual(service.factory.timedOut, 2)
