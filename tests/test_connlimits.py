"""tcplab-file's --max-connections and --max-per-peer: a connection over a limit gets one
``ERR too-many-connections`` line and is closed, and ``tcplab send`` turns that into exit 7."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcplab.errors import ExitCode
from tcplab.file import tap as filetap
from tcplab.file.receiver import MAX_TURNING_AWAY, FileReceiver, FileReceiverFactory, peerKey
from tcplab.file.sender import ServerBusy, Uploader, UploadProtocol
from tcplab.file.store import FileStore, synchronous
from tcplab.file.wire import Err, ErrorCode, Ok, formatPut, parseReply
from tests.support import ServerProcess, childEnv, scratch


def v4(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class LimitTests(SynchronousTestCase):
    """The limits in the protocol, through StringTransport."""

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.clock = Clock()
        self.store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(self.store.close)

    def factory(self, **kwargs: Any) -> FileReceiverFactory:
        return FileReceiverFactory(self.store, clock=self.clock, **kwargs)

    def connect(self, factory: FileReceiverFactory, address: Any) -> tuple[FileReceiver, StringTransport]:
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def assertTurnedAway(self, transport: StringTransport, *words: str) -> None:
        lines = transport.value().split(b"\n")
        self.assertEqual(len(lines), 2, "one line, then nothing")
        reply = parseReply(lines[0])
        self.assertIsInstance(reply, Err)
        assert isinstance(reply, Err)
        self.assertEqual(reply.code, ErrorCode.TOO_MANY_CONNECTIONS)
        for word in words:
            self.assertIn(word, reply.message)

    def test_totalLimit(self) -> None:
        """A connection over --max-connections is told to try again later, gets nothing else whatever it sends, is
        closed after the linger, and a freed slot lets the next one store its file."""
        factory = self.factory(maxConnections=2)
        first, _ = self.connect(factory, v4("10.0.0.1"))
        self.connect(factory, v4("10.0.0.2"))
        refused, transport = self.connect(factory, v4("10.0.0.3"))
        self.assertTurnedAway(transport, "--max-connections", "try again later")
        refused.dataReceived(formatPut(2, "sneaky") + b"hi")
        self.assertTurnedAway(transport)
        self.clock.advance(factory.linger)
        self.assertTrue(transport.disconnected, "closed after the linger at the latest")
        refused.connectionLost(Failure(Exception("gone")))
        self.assertEqual((factory.admitted, factory.connections, factory.turnedAway), (2, 2, 1))
        first.connectionLost(Failure(Exception("gone")))
        protocol, transport = self.connect(factory, v4("10.0.0.3"))
        protocol.dataReceived(formatPut(2, "a") + b"hi")
        self.assertIsInstance(parseReply(transport.value().split(b"\n")[0]), Ok)
        self.assertEqual(sorted(os.listdir(self.dir)), ["received_a"])

    def test_perPeer(self) -> None:
        """A connection over --max-per-peer from one address is turned away naming the address and the option, while
        other addresses and freed slots are let in."""
        factory = self.factory(maxPerPeer=2)
        held = [self.connect(factory, v4("10.0.0.1", 40000 + i))[0] for i in range(2)]
        _, transport = self.connect(factory, v4("10.0.0.1", 40009))
        self.assertTurnedAway(transport, "2 connections from 10.0.0.1", "--max-per-peer")
        _, other = self.connect(factory, v4("10.0.0.2"))
        self.assertEqual(other.value(), b"", "another address is let in")
        held[0].connectionLost(Failure(Exception("gone")))
        _, transport = self.connect(factory, v4("10.0.0.1", 40010))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(factory.perPeer, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_countsReturnToZero(self) -> None:
        """Admitted and turned-away connections alike leave no trace in the counts (no leak)."""
        factory = self.factory(maxConnections=3, maxPerPeer=2)
        protocols = [self.connect(factory, v4(f"10.0.0.{i % 3}", 40000 + i))[0] for i in range(10)]
        self.assertEqual(factory.admitted, 3)
        for protocol in protocols:
            protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual((factory.admitted, factory.connections, factory.perPeer), (0, 0, {}))

    def test_turnedAwayClosedPromptly(self) -> None:
        """A turned-away connection that neither reads nor closes is aborted after one second."""
        factory = self.factory(maxConnections=1)
        self.connect(factory, v4("10.0.0.1"))
        _, transport = self.connect(factory, v4("10.0.0.2"))
        self.assertTurnedAway(transport)
        self.clock.advance(0.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "aborted after 1 s, not the 5 s an upload's ERR gets")

    def test_waitingToBeTurnedAwayIsBounded(self) -> None:
        """Past --max-connections, at most a few refused connections wait to go; the rest get their
        ERR and are closed at once, so a flood holds no more descriptors."""
        factory = self.factory(maxConnections=1, maxTurningAway=3)
        self.connect(factory, v4("10.0.0.1"))
        refused = [self.connect(factory, v4("10.0.0.1", 40001 + i)) for i in range(6)]
        for _, transport in refused:
            self.assertTurnedAway(transport, "--max-connections")
        self.assertEqual([t.disconnecting for _, t in refused], [False] * 3 + [True] * 3)
        self.assertEqual(factory.turningAway, 3)
        refused[0][0].connectionLost(Failure(Exception("gone")))
        self.assertEqual(factory.turningAway, 2)
        _, transport = self.connect(factory, v4("10.0.0.1", 40100))
        self.assertFalse(transport.disconnecting, "a free place to wait is used again")
        for protocol, _ in refused[1:]:
            protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(factory.turningAway, 1)
        self.assertEqual(factory.turnedAway, 7)

    def test_noLimitsByDefault(self) -> None:
        """With --max-connections 0 and --max-per-peer 0 hundreds of connections from one address are let in."""
        factory = self.factory()
        transports = [self.connect(factory, v4("10.0.0.1", 40000 + i))[1] for i in range(300)]
        self.assertEqual([t.value() for t in transports], [b""] * 300)

    def test_peerKeys(self) -> None:
        """An IPv6 host usually has a /64 to choose addresses from: it counts as one peer."""
        self.assertEqual(peerKey(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::/64")
        self.assertEqual(peerKey(IPv6Address("TCP", "2001:db8::ffff:2", 1)), "2001:db8::/64")
        self.assertEqual(peerKey(IPv6Address("TCP", "2001:db8:0:1::1", 1)), "2001:db8:0:1::/64")
        self.assertEqual(peerKey(IPv6Address("TCP", "fe80::1%eth0", 1)), "fe80::/64")
        self.assertEqual(peerKey(IPv6Address("TCP", "::ffff:10.0.0.1", 1)), "10.0.0.1")
        self.assertEqual(peerKey(v4("10.0.0.1")), "10.0.0.1")
        self.assertIsNone(peerKey(UNIXAddress(None)))

    def test_unixSocketsOnlyCountTowardsTheTotal(self) -> None:
        """Unix socket connections are limited by --max-connections only, never by the per-peer limit."""
        factory = self.factory(maxConnections=3, maxPerPeer=1)
        transports = [self.connect(factory, UNIXAddress(None))[1] for _ in range(4)]
        self.assertEqual([t.value() for t in transports[:3]], [b""] * 3)
        self.assertTurnedAway(transports[3], "--max-connections")

    def test_warningsLoggedAtALimitedRate(self) -> None:
        """A flood of refused connections or bad requests is counted, not logged line by line."""
        factory = self.factory(maxConnections=100)
        with capturedLogs() as events:
            for i in range(1000):
                protocol, _ = self.connect(factory, v4("10.0.0.1", 40000 + i))
                protocol.dataReceived(b"BREW coffee\n")
            self.assertEqual(factory.turnedAway, 900)
            warnings = [e for e in events if e.get("log_level") is LogLevel.warn]
            self.assertLessEqual(len(warnings), 101)
            self.assertEqual(factory.unlogged, 1000 - len(warnings))
            self.clock.advance(1)
            self.connect(factory, v4("10.0.0.1", 39999))
        self.assertIn("not logged", events[-1]["log_format"])
        self.assertEqual(events[-1]["skipped"], factory.unlogged)

    def test_options(self) -> None:
        """By default a file server allows 256 connections and 16 per peer, the options change that, and bad values
        are one-line usage errors."""
        options = filetap.Options()
        options.parseOptions(["--dir", self.dir])
        self.assertEqual((options["max-connections"], options["max-per-peer"]), (256, 16))
        service = filetap.FileService(options)
        self.addCleanup(service.store.close)
        self.assertEqual((service.factory.maxConnections, service.factory.maxPerPeer), (256, 16))
        options = filetap.Options()
        options.parseOptions(["--dir", self.dir, "--max-connections", "0", "--max-per-peer", "3"])
        self.assertEqual((options["max-connections"], options["max-per-peer"]), (0, 3))
        for argv in (["--max-connections", "-1"], ["--max-per-peer", "many"]):
            error = self.assertRaises(usage.UsageError, filetap.Options().parseOptions, ["--dir", self.dir, *argv])
            self.assertNotIn("\n", str(error))


class Holder(Protocol):
    """A connection that just stays open (and notes what it is told)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class LoopbackLimitTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.src = scratch(self)
        with open(os.path.join(self.src, "a.txt"), "wb") as f:
            f.write(b"hello\n")

    def startServer(self, *argv: str) -> filetap.FileService:
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", self.dir, *argv])
        service = filetap.FileService(options)
        service.startService()
        self.addCleanup(service.stopService)
        self.port = service.tcp.ports[0].getHost().port
        return service

    async def hold(self, count: int, source: str = "127.0.0.1") -> list[Holder]:
        holders = []
        for _ in range(count):
            holder = Holder()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
            await endpoint.connect(Factory.forProtocol(lambda h=holder: h))
            self.addCleanup(lambda h=holder: (h.transport.abortConnection(), h.lost)[1])
            holders.append(holder)
        return holders

    async def send(self, *argv: str) -> tuple[int, bytes, bytes]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tcplab", "send", "--quiet", "--port", str(self.port), *argv],
            env=childEnv(), path=self.src)
        return code, out, err

    async def test_sendExitsSevenWhenTurnedAway(self) -> None:
        """tcplab send turned away by the per-peer limit exits 7 with one line naming the option and code, stores
        nothing, and succeeds once a slot is free."""
        service = self.startServer("--max-per-peer", "2")
        holders = await self.hold(2)
        code, out, err = await self.send("a.txt", "a.txt")
        self.assertEqual((code, out), (ExitCode.REFUSED, b""), err)
        self.assertEqual(err.count(b"\n"), 1, err)
        self.assertIn(b"turned the connection away", err)
        self.assertIn(b"--max-per-peer", err)
        self.assertIn(b"(too-many-connections)", err)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(service.factory.turnedAway, 1, "the first refusal ends the run")
        holders[0].transport.loseConnection()
        await holders[0].lost
        code, out, err = await self.send("a.txt")
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(os.listdir(self.dir), ["received_a.txt"])

    async def test_totalLimit(self) -> None:
        """tcplab send turned away by the total limit exits 7 naming --max-connections."""
        self.startServer("--max-connections", "3", "--max-per-peer", "0")
        await self.hold(3)
        code, _, err = await self.send("a.txt")
        self.assertEqual(code, ExitCode.REFUSED, err)
        self.assertIn(b"--max-connections", err)

    async def test_otherAddressesStillServed(self) -> None:
        """One address holding all its connections does not keep another from uploading."""
        service = self.startServer("--max-per-peer", "4")
        holders = await self.hold(5, "127.0.0.2")
        await holders[-1].lost
        self.assertTrue(holders[-1].received.startswith(b"ERR too-many-connections "), holders[-1].received)

        def connect() -> Deferred[Any]:
            client = UploadProtocol(reactor, 10)
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=("127.0.0.3", 0))
            return endpoint.connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect)
        sent = await uploader.send(os.path.join(self.src, "a.txt"), "a.txt")
        await uploader.close()
        self.assertEqual(sent.stored, "received_a.txt")
        self.assertEqual(service.factory.perPeer.get("127.0.0.2"), 4)

    async def test_uploaderRaisesServerBusy(self) -> None:
        """An uploader turned away by a full server fails with ServerBusy."""
        self.startServer("--max-connections", "1")
        await self.hold(1)

        def connect() -> Deferred[Any]:
            client = UploadProtocol(reactor, 10)
            return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(Factory.forProtocol(lambda: client))

        uploader = Uploader(connect)
        with self.assertRaises(ServerBusy):
            await uploader.send(os.path.join(self.src, "a.txt"), "a.txt")
        await uploader.close()


class FloodTests(SynchronousTestCase):
    """Issue 11 item 9: turned-away connections cannot pile up, in a real twistd with few descriptors."""

    flood = 400

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.server = ServerProcess("tcplab-file", "--listen", "tcp:0:interface=127.0.0.1", "--dir", self.dir,
                                    "--max-connections", "64", "--max-per-peer", "16", openFiles=256)
        self.addCleanup(self.server.stop)

    def serverFds(self) -> int:
        return len(os.listdir(f"/proc/{self.server.process.pid}/fd"))

    def connectFrom(self, source: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.server.port))
        return sock

    def test_floodFromOneAddressLeavesAnotherServed(self) -> None:
        """400 connections from 127.0.0.1 that never read nor close, against RLIMIT_NOFILE 256:
        127.0.0.2 still uploads at once, and the server's descriptors stay bounded."""
        flood = [self.connectFrom("127.0.0.1") for _ in range(self.flood)]
        for sock in flood[:32]:
            sock.sendall(formatPut(5, "flood") + b"hello")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and b"too-many-connections" not in self.peek(flood[-1]):
            time.sleep(0.02)
        # Once the last of the flood is answered, what is still open is what waits to be closed (a
        # busy machine can catch the server mid-way through one burst of accepts, which says nothing).
        most = 0
        for _ in range(5):
            most = max(most, self.serverFds())
            time.sleep(0.05)
        started = time.monotonic()
        other = self.connectFrom("127.0.0.2")
        other.settimeout(3)
        other.sendall(formatPut(5, "a.txt") + b"hello")
        try:
            reply = other.recv(4096)
        except OSError as e:
            self.fail(f"127.0.0.2 was not served during the flood: {e}")
        self.assertTrue(reply.startswith(b"OK 5 "), reply)
        self.assertLess(time.monotonic() - started, 2, "served at once, not after the flood drained")
        most = max(most, self.serverFds())
        self.assertLess(most, 16 + MAX_TURNING_AWAY + 40, "descriptors held for turned-away connections pile up")
        self.assertIn("received_a.txt", os.listdir(self.dir))
        self.assertNotIn("Traceback", self.server.stop())

    def peek(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""
        except OSError:
            return b"reset"
