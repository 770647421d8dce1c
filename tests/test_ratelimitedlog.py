"""One rate-limited log for the hub's client events and the file server's warnings."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tcplab.file.receiver import FileReceiverFactory
from tcplab.file.store import FileStore, synchronous
from tcplab.ratelimit import RateLimitedLog
from tests.support import scratch
from tests.test_multi import Room


class RateLimitedLogTests(SynchronousTestCase):
    def test_floodIsCountedAndNamedInTheNextLine(self) -> None:
        """Past the burst, events are counted, not logged; the next line logged says how many were left out."""
        clock = Clock()
        limited = RateLimitedLog(Logger(namespace="test"), LogLevel.warn, 1, 3, clock.seconds)
        with capturedLogs() as events:
            results = [limited("event {n}", n=n) for n in range(10)]
            self.assertEqual(results, [True] * 3 + [False] * 7)
            self.assertEqual(len(events), 3)
            clock.advance(1)
            self.assertTrue(limited("event {n}", n=10))
        self.assertEqual(limited.unlogged, 7)
        self.assertEqual((events[-1]["n"], events[-1]["skipped"]), (10, 7))
        self.assertIn("not logged", events[-1]["log_format"])
        self.assertIs(events[-1]["log_level"], LogLevel.warn)
        self.assertEqual(events[-1]["log_namespace"], "test")
        with capturedLogs() as events:
            clock.advance(1)
            limited("event {n}", n=11)
        self.assertNotIn("skipped", events[-1], "the count is said once")

    def test_hubSaysHowManyClientEventsItLeftOut(self) -> None:
        """After a storm of connections, the hub's next client log line says how many were not logged."""
        room = Room(noticeLimit=0)
        with capturedLogs() as events:
            for _ in range(300):
                room.connect()
            room.clock.advance(60)
            room.connect()
        self.assertEqual(room.hub.stats.unlogged, 100)
        self.assertEqual(events[-1]["skipped"], 100)
        self.assertIs(events[-1]["log_level"], LogLevel.info)
        self.assertEqual(events[-1]["log_namespace"], "tcplab.multi.hub")

    def test_fileServerWarningsShareIt(self) -> None:
        """The file server's warnings about clients are limited the same way, at warn level."""
        clock = Clock()
        store = FileStore(scratch(self), runBlocking=synchronous)
        self.addCleanup(store.close)
        factory = FileReceiverFactory(store, clock=clock)
        with capturedLogs() as events:
            for port in range(200):
                protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000 + port))
                protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000 + port)))
                protocol.dataReceived(b"BREW coffee\n")
            clock.advance(1)
            factory.warn("one more")
        self.assertEqual(events[-1]["skipped"], factory.unlogged)
        self.assertGreater(factory.unlogged, 0)
        self.assertIs(events[-1]["log_level"], LogLevel.warn)
        self.assertEqual(events[-1]["log_namespace"], "tcplab.file.receiver")
