"""Promises of the three servers that no other module held: documented defaults, the order of
privilege drop and listening, exact reply lines and grace periods, and the file server's logs,
stale-file cleaning and end of a refused connection. (Mapped in docs/GUARANTEES.md.)"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tcplab.echo import tap as echotap
from tcplab.echo.server import UDPEcho
from tcplab.file import tap as filetap
from tcplab.file.store import synchronous
from tcplab.file.wire import formatPut, formatStat, parseReply
from tcplab.listening import somaxconn
from tcplab.multi import tap as multitap
from tcplab.testing import FakeTransport
from tests.support import scratch
from tests.test_fileserver import ServerTestCase, sha
from tests.test_multi import Room


class EchoPromiseTests(SynchronousTestCase):
    def test_udpRateAndBurstDefaults(self) -> None:
        """--udp-rate and --udp-burst default to 100 replies a second in bursts of 200, as documented."""
        options = echotap.Options()
        options.parseOptions([])
        self.assertEqual((options["udp-rate"], options["udp-burst"]), (100, 200))
        self.assertFalse(options["udp"], "UDP echo is off unless asked for")

    def test_port1024IsAnswered(self) -> None:
        """Only source ports below 1024 are ignored: 1024 itself is an ordinary client port."""
        sent: list[Any] = []
        echo = UDPEcho(rate=10, burst=10, clock=Clock().seconds)
        echo.transport = type("T", (), {"write": lambda self, data, addr: sent.append((data, addr))})()
        echo.datagramReceived(b"low", ("127.0.0.1", 1023))
        echo.datagramReceived(b"ok", ("127.0.0.1", 1024))
        self.assertEqual(sent, [(b"ok", ("127.0.0.1", 1024))])


class ListeningPromiseTests(SynchronousTestCase):
    def services(self) -> list[tuple[str, Any, Any]]:
        """Each server's service (on a fake reactor) with the listening service that holds its ports."""
        clock = MemoryReactorClock()
        found: list[tuple[str, Any, Any]] = []
        echo = echotap.Options()
        echo.parseOptions(["--port", "0", "--interface", "127.0.0.1"])
        service = echotap.EchoService(echo, clock)
        found.append(("echo", service, service.tcp))
        multi = multitap.Options()
        multi.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0"])
        service = multitap.HubService(multi, clock)
        found.append(("multi", service, service.listening))
        files = filetap.Options()
        files.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--dir", scratch(self)])
        service = filetap.FileService(files, clock)
        self.addCleanup(service.store.close)
        found.append(("file", service, service.tcp))
        return found

    def test_defaultBacklogIsRaisedAndCapped(self) -> None:
        """Every server listens with a backlog of 1024 (capped by somaxconn), not Twisted's 50."""
        cap = somaxconn()
        expected = min(1024, cap) if cap else 1024
        for name, _, listening in self.services():
            with self.subTest(server=name):
                self.assertEqual([d.split(":backlog=")[1] for d in listening.descriptions], [str(expected)])

    def test_portsOpenOnlyAfterPrivilegesAreDropped(self) -> None:
        """twistd switches user (--uid) between privilegedStartService and startService: no tcplab
        server may open its port before that switch (SECURITY.md: run as an unprivileged user)."""
        for name, service, listening in self.services():
            with self.subTest(server=name):
                service.privilegedStartService()
                self.assertEqual(listening.ports, [], "no port before the user switch")
                service.startService()
                self.assertEqual(len(listening.ports), 1)
                service.stopService()


class MultiPromiseTests(SynchronousTestCase):
    def test_nickRepliesAsDocumented(self) -> None:
        """The /nick replies are the lines docs/PROTOCOL.md lists, word for word."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"/nick\n/nick al ice\n/nick alice\n/nick alice\n")
        self.assertEqual(ta.take().split(b"\n")[1::2], [
            b"* error: give a name: /nick NAME",
            b'* error: "al ice" is not a valid name: use 1-32 letters, digits, _ - or .',
            b"* you are now alice",
            b"* you are already alice",
        ])
        self.assertEqual(tb.take(), b"* 127.0.0.1:40001 is now alice\n", "only the real change is announced")

    def test_clientTheServerClosesGetsFiveSeconds(self) -> None:
        """A client the server closes (here after /quit) has 5 seconds to take its last lines,
        then the connection is aborted."""
        room = Room()
        a, ta = room.connect()
        a.dataReceived(b"/quit\n")
        self.assertTrue(ta.disconnecting)
        room.clock.advance(4.9)
        self.assertFalse(ta.disconnected, "still time to read '* bye'")
        room.clock.advance(0.2)
        self.assertTrue(ta.disconnected)

    def test_softOpenFilesLimitRaisedToHard(self) -> None:
        """At start tcplab-multi lifts the soft open-files limit to the hard one, and logs it."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard < 64:
            raise SkipTest("needs a finite hard open-files limit")
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard - 1), hard))
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0"])
        service = multitap.HubService(options, MemoryReactorClock())
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        self.assertTrue(any("open files limit" in formatEvent(e) and str(hard) in formatEvent(e) for e in events))

    def test_backplaneDefaults(self) -> None:
        """--backplane defaults: channel tcplab-multi, presence 15 s, reconnecting after 1 s up to
        10 s apart, at most 4 MiB unanswered and 10 s without an answer."""
        options = multitap.Options()
        options.parseOptions(["--backplane", "redis://127.0.0.1"])
        service = multitap.HubService(options, MemoryReactorClock())
        backplane = service.backplane
        assert backplane is not None
        self.assertEqual((backplane.address.port, backplane.address.db, backplane.channel, backplane.ttl),
                         (6379, 0, "tcplab-multi", 15.0))
        self.assertEqual((backplane.initialDelay, backplane.maxDelay, backplane.replyTimeout),
                         (1.0, 10.0, 10.0))
        self.assertEqual(backplane.maxUnanswered, 4 << 20)


class FileOptionPromiseTests(SynchronousTestCase):
    def test_documentedDefaults(self) -> None:
        """The defaults in README's tcplab-file table."""
        options = filetap.Options()
        options.parseOptions([])
        self.assertEqual(
            (options["port"], options["dir"], options["prefix"], options["max-size"], options["overwrite"],
             options["header-timeout"], options["idle-timeout"], options["max-files-per-connection"],
             options["partial-ttl"], options["max-connections"], options["max-per-peer"], options["backlog"]),
            (9000, ".", "received_", None, False, 30, 300, 1000, 86400, 256, 16, 1024),
        )

    def test_maxSizeUnitsArePowersOf1024(self) -> None:
        """--max-size takes bytes, or K, M, G, T as powers of 1024."""
        for value, size in (("1000", 1000), ("1K", 1024), ("3M", 3 << 20), ("2G", 2 << 30), ("1T", 1 << 40)):
            options = filetap.Options()
            options.parseOptions(["--dir", scratch(self), "--max-size", value])
            self.assertEqual(options["max-size"], size, value)


class FilePromiseTests(ServerTestCase):
    def test_errThenFinThenFiveSecondsOfDiscard(self) -> None:
        """After an ERR the server sends nothing more, shuts down its sending side, reads and
        discards what the client still sends for 5 seconds, then closes."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = FakeTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"PUT 5000000 ../escape\n" + b"x" * 10000)
        self.assertEqual(transport.value().count(b"\n"), 1)
        self.assertEqual(parseReply(transport.value()[:-1]).code, "bad-name")
        self.assertTrue(transport.writeClosed, "FIN after the ERR")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(4.9)
        protocol.dataReceived(b"y" * 10000 + formatPut(1, "b") + b"b")
        self.assertEqual(transport.value().count(b"\n"), 1, "the ERR stays the last line")
        self.assertFalse(transport.aborted, "still draining at 4.9 s")
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted, "closed after 5 s")
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertNothingStored()

    def assertNothingStored(self) -> None:
        self.assertEqual((self.visible(), self.hidden()), ({}, []))

    def test_stalledBodyIsKeptForResume(self) -> None:
        """A resumable body that stalls for --idle-timeout gets ERR timeout, and what arrived is
        kept: a STAT then reports it."""
        self.factory = self.makeFactory(idleTimeout=10)
        data = os.urandom(100)
        protocol, transport = self.send(formatPut(len(data), "a", trailer=True) + data[:40])
        self.clock.advance(10)
        self.assertRefused(transport, "timeout")
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.visible(), {})
        self.assertEqual(len(self.hidden()), 1)
        _, transport = self.send(formatStat(len(data), "a"))
        reply = self.replies(transport)[0]
        self.assertEqual((reply.offset, reply.sha256), (40, sha(data[:40])))

    def test_namesInLogsAreEscaped(self) -> None:
        """A name with an escape or an invisible character reaches the log escaped, stored or refused."""
        with capturedLogs() as events:
            self.send(b"PUT 3 evil\x1b[2J\nabc")
            self.send(formatPut(1, "zero\u200bwidth") + b"z")
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("evil\\x1b[2J", text)
        self.assertIn("zero\\u200bwidth", text)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\u200b", text)
        self.assertEqual(self.visible(), {"received_zero\u200bwidth": b"z"})


class FileServiceCleaningTests(SynchronousTestCase):
    def test_staleFilesRemovedAtStartAndPeriodically(self) -> None:
        """Hidden temporary and partial files untouched for --partial-ttl go at start, and then
        periodically while the server runs; user files are never touched."""
        folder = scratch(self)

        def plant(name: str) -> str:
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(b"x")
            past = time.time() - 1000
            os.utime(path, (past, past))
            return name

        plant(".tcplab-" + "0" * 32 + ".tmp")
        plant("received_old.txt")
        options = filetap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--dir", folder, "--partial-ttl", "100"])
        clock = MemoryReactorClock()
        service = filetap.FileService(options, clock)
        service.store.runBlocking = synchronous
        self.addCleanup(service.store.close)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(os.listdir(folder), ["received_old.txt"], "removed at start")
        plant(".tcplab-" + "1" * 32 + ".partial")
        clock.advance(100)
        self.assertEqual(os.listdir(folder), ["received_old.txt"], "and again later")


class NcOneLinerTests(TestCase):
    timeout = 30

    async def test_openbsdNcWithN(self) -> None:
        """README: with OpenBSD nc, -N makes the one-liner work (nc signals the end of input)."""
        nc = shutil.which("nc")
        if nc is None:
            raise SkipTest("nc is not installed")
        if b"-N" not in subprocess.run([nc, "-h"], capture_output=True).stderr:
            raise SkipTest("this nc is not OpenBSD netcat (no -N)")
        folder, src = scratch(self), scratch(self)
        options = filetap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--dir", folder])
        service = filetap.FileService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.tcp.ports[0].getHost().port
        data = b"nc -N upload\n" * 1000
        with open(os.path.join(src, "f.txt"), "wb") as f:
            f.write(data)
        line = f"{{ printf 'PUT %d %s\\n' \"$(stat -c%s f.txt)\" f.txt; cat f.txt; }} | nc -N 127.0.0.1 {port}"
        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", line], env=dict(os.environ), path=src)
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out, f"OK {len(data)} {sha(data)} received_f.txt\n".encode())
        with open(os.path.join(folder, "received_f.txt"), "rb") as f:
            self.assertEqual(f.read(), data)
