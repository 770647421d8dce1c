"""Several tcplab-multi hubs as one room: the backplane envelope, its dedup and presence logic over an
in-memory bus, then real ``redis-server`` processes: two nodes, Redis killed and restarted, and two
twistd processes sharing one port with --reuse-port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.multi import backplane as bp
from tcplab.multi import envelope as bpwire
from tcplab.multi import redis as bpredis
from tcplab.multi import tap as multitap
from tcplab.multi.hub import HubClient, HubConfig, MultiHub
from tests.support import ServerProcess
from tests.test_multi import FlowTransport
from tests.test_multi_loopback import LineClient, chatLines

TIMEOUT = 15.0


# -- the envelope


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
frames = st.builds(
    bpwire.Frame,
    st.sampled_from([bpwire.LINES, bpwire.JOIN, bpwire.PART, bpwire.NICK, bpwire.HELLO, bpwire.BYE]), names, names,
    st.binary(max_size=300),
)


class EnvelopeTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), st.integers(1, (1 << 64) - 1),
           st.lists(frames, max_size=6))
    def test_roundTrip(self, node: str, seq: int, frameList: list[bpwire.Frame]) -> None:
        """Any node id, sequence number and list of frames decode back to exactly what was encoded."""
        data = bpwire.encodeEnvelope(node, seq,
                                     [bpwire.encodeFrame(f.kind, f.name, f.other, f.payload) for f in frameList])
        self.assertEqual(bpwire.decodeEnvelope(data), bpwire.Envelope(node, seq, tuple(frameList)))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(frames, min_size=1, max_size=4))
    def test_everyTruncationIsRefusedOrAPrefix(self, frameList: list[bpwire.Frame]) -> None:
        """A cut message never decodes into frames that were not sent."""
        data = bpwire.encodeEnvelope("n1", 7,
                                     [bpwire.encodeFrame(f.kind, f.name, f.other, f.payload) for f in frameList])
        for cut in range(len(data)):
            try:
                envelope = bpwire.decodeEnvelope(data[:cut])
            except bpwire.BadEnvelope:
                continue
            self.assertEqual(envelope.frames, tuple(frameList[:len(envelope.frames)]))

    def test_garbageIsRefused(self) -> None:
        """Empty, foreign, wrong-version, badly named, truncated, frameless and unknown-kind messages are all refused
        as BadEnvelope."""
        good = bpwire.encodeEnvelope("n1", 1, [bpwire.encodeFrame(bpwire.LINES, "a", "", b"x\n")])
        for data in (b"", b"hello", b"TLB\x02" + good[4:], good.replace(b"n1", b"n "), good[:-3] + b"Z",
                     bpwire.encodeEnvelope("n1", 0, []), good.replace(b"L\x01a", b"Q\x01a")):
            self.assertRaises(bpwire.BadEnvelope, bpwire.decodeEnvelope, data)

    def test_namesAreLimited(self) -> None:
        """A name longer than the wire format allows is refused when encoding rather than cut."""
        self.assertRaises(ValueError, bpwire.encodeFrame, bpwire.JOIN, "x" * 256)

    def test_snapshot(self) -> None:
        """A presence snapshot round-trips its sequence number and names, empty ones included, and garbage is
        refused."""
        self.assertEqual(bpwire.decodeSnapshot(bpwire.encodeSnapshot(12, ["alice", "127.0.0.1:5000"])),
                         (12, ["alice", "127.0.0.1:5000"]))
        self.assertEqual(bpwire.decodeSnapshot(bpwire.encodeSnapshot(3, [])), (3, []))
        self.assertRaises(bpwire.BadEnvelope, bpwire.decodeSnapshot, b"x\nalice")

    def test_nodeIds(self) -> None:
        """Every node gets a different id made only of safe characters."""
        ids = {bpwire.makeNodeId() for _ in range(20)}
        self.assertEqual(len(ids), 20)
        for node in ids:
            self.assertRegex(node, r"\A[A-Za-z0-9._-]{1,64}\Z")


class RedisURLTests(unittest.TestCase):
    def test_good(self) -> None:
        """Redis URLs with host, port, database, IPv6 and credentials parse to the right address, with defaults
        filled in and the password never shown."""
        self.assertEqual(bpredis.parseRedisURL("redis://127.0.0.1:6380/2"), bpredis.RedisAddress("127.0.0.1", 6380, 2))
        self.assertEqual(bpredis.parseRedisURL("redis://cache"), bpredis.RedisAddress("cache", 6379, 0))
        self.assertEqual(bpredis.parseRedisURL("redis://[::1]:7000/"), bpredis.RedisAddress("::1", 7000, 0))
        self.assertEqual(bpredis.parseRedisURL("redis://u:p%40ss@h/1"), bpredis.RedisAddress("h", 6379, 1, "u", "p@ss"))
        self.assertEqual(str(bpredis.parseRedisURL("redis://:secret@[::1]:7000/3")), "redis://[::1]:7000/3",
                         "no password in logs")

    def test_bad(self) -> None:
        """Unsupported schemes, missing hosts, bad ports or databases, query strings and unix URLs are refused with
        one-line errors."""
        for url in ("http://h:1/0", "rediss://h/0", "redis://:6379/0", "redis://h:port/0", "redis://h/db",
                    "redis://h:99999/0", "redis://h/0?x=1", "unix:///tmp/redis.sock"):
            error = self.assertRaises(ValueError, bpredis.parseRedisURL, url)
            self.assertNotIn("\n", str(error))


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> multitap.Options:
        options = multitap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """Without --backplane the hub runs alone on an ordinary listener."""
        options = self.parse()
        self.assertIsNone(options["backplane"])
        self.assertFalse(options["reuse-port"])
        service = multitap.HubService(options)
        self.assertIsNone(service.backplane)
        self.assertIsInstance(service.listening, multitap.ListeningService)

    def test_backplane(self) -> None:
        """--backplane, --channel and --presence-ttl give the hub a Redis backplane on that address and channel, and
        the channel defaults to tcplab-multi."""
        options = self.parse("--backplane", "redis://127.0.0.1:6390/1", "--channel", "room-1", "--presence-ttl", "3")
        self.assertEqual(options["backplane"], bpredis.RedisAddress("127.0.0.1", 6390, 1))
        service = multitap.HubService(options)
        assert service.backplane is not None
        self.assertEqual((service.backplane.channel, service.backplane.ttl), ("room-1", 3.0))
        self.assertIs(service.hub.backplane, service.backplane)
        self.assertEqual(service.backplane.presenceKey, f"room-1:node:{service.backplane.nodeId}")
        self.assertEqual(self.parse("--backplane", "redis://h")["channel"], "tcplab-multi")

    def test_badValuesAreOneLineErrors(self) -> None:
        """Bad backplane, channel, reuse-port and presence-ttl options are rejected with one-line usage errors."""
        for argv in (["--backplane", "http://h/0"], ["--channel", "x"],
                     ["--backplane", "redis://h", "--channel", "a b"], ["--reuse-port", "--listen", "tcp:7001"],
                     ["--presence-ttl", "0"]):
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertNotIn("\n", str(error))

    def test_backplaneWithoutTxredisapi(self) -> None:
        """--backplane without txredisapi installed says which package to install, in one line."""
        self.patch(multitap.importlib.util, "find_spec", lambda name: None)
        error = self.assertRaises(usage.UsageError, self.parse, "--backplane", "redis://h")
        self.assertEqual(str(error), "--backplane needs the txredisapi package: pip install txredisapi")

    def test_reusePortListens(self) -> None:
        """With --reuse-port two hubs can listen on the same address and port."""
        service = multitap.HubService(self.parse("--reuse-port", "--port", "0", "--interface", "127.0.0.1"))
        self.assertIsInstance(service.listening, multitap.ReusePortService)
        service.startService()
        self.addCleanup(service.stopService)
        [port] = service.listening.ports  # type: ignore[union-attr]
        self.assertEqual(port.getHost().host, "127.0.0.1")
        other = multitap.HubService(self.parse("--reuse-port", "--port", str(port.getHost().port),
                                                 "--interface", "127.0.0.1"))
        other.startService()
        self.addCleanup(other.stopService)
        self.assertEqual(other.listening.ports[0].getHost().port, port.getHost().port)

    def test_portTakenWithoutReusePort(self) -> None:
        """--reuse-port on a port already taken by an ordinary listener fails with one line mentioning --reuse-port."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            service = multitap.HubService(self.parse("--reuse-port", "--port", str(taken.getsockname()[1]),
                                                       "--interface", "127.0.0.1"))
            error = self.assertRaises(SystemExit, service.startService)
            self.assertIn("--reuse-port", str(error))
            self.assertNotIn("\n", str(error))
            service.stopService()


# -- the logic, over an in-memory bus


class FakeBus:
    """Pub/sub in memory: every message to every node (the sender too, as Redis does)."""

    def __init__(self) -> None:
        self.nodes: list[FakeBackplane] = []
        self.up = True
        self.messages: list[bytes] = []
        self.copies = 1

    def publish(self, message: bytes) -> None:
        self.messages.append(message)
        for node in list(self.nodes):
            for _ in range(self.copies):
                node.received(message)


class FakeBackplane(bp.Backplane):
    def __init__(self, bus: FakeBus, clock: Clock, nodeId: str) -> None:
        super().__init__(nodeId, clock, ttl=15.0)
        self.bus = bus
        bus.nodes.append(self)
        self.presenceWanted = 0

    def _canSend(self, size: int) -> bool:
        return self.bus.up

    def _send(self, message: bytes) -> None:
        self.bus.publish(message)

    def _wantPresence(self) -> None:
        self.presenceWanted += 1


class Cluster:
    """Hubs joined by a FakeBus, on one fake clock; clients on fake transports."""

    def __init__(self, nodes: int = 2, **config: object) -> None:
        self.clock = Clock()
        self.bus = FakeBus()
        self.hubs = [MultiHub(HubConfig(**config), self.clock, FakeBackplane(self.bus, self.clock, f"node{i}"))
                     for i in range(nodes)]
        self.nextPort = 40000

    def connect(self, hub: int, bufferSize: int = 1 << 30) -> tuple[HubClient, FlowTransport]:
        self.nextPort += 1
        address = IPv4Address("TCP", "127.0.0.1", self.nextPort)
        client = self.hubs[hub].buildProtocol(address)
        transport = FlowTransport(address, bufferSize)
        client.makeConnection(transport)
        self.settle()
        return client, transport

    def settle(self) -> None:
        """Let queued frames go out (they wait for the end of the reactor turn)."""
        self.clock.advance(0)

    def takeAll(self) -> None:
        for hub in self.hubs:
            for member in hub.members:
                member.transport.take()

    def backplane(self, hub: int) -> FakeBackplane:
        return self.hubs[hub].backplane  # type: ignore[return-value]


class ClusterTests(unittest.TestCase):
    def test_lineReachesEveryClientOnceNeverBack(self) -> None:
        """A line reaches local clients at once and clients on other nodes by the end of the reactor turn, each
        exactly once, and is never sent back to its own node."""
        cluster = Cluster()
        a1, ta1 = cluster.connect(0)
        _, ta2 = cluster.connect(0)
        _, tb1 = cluster.connect(1)
        cluster.takeAll()
        a1.dataReceived(b"hi \x1b[2J\n")
        self.assertEqual(ta2.take(), b"<127.0.0.1:40001> hi \\x1b[2J\n", "local clients at once")
        self.assertEqual(tb1.value(), b"", "remote ones at the end of the reactor turn")
        cluster.settle()
        self.assertEqual(tb1.take(), b"<127.0.0.1:40001> hi \\x1b[2J\n")
        self.assertEqual(ta1.take(), b"hi \x1b[2J\n")
        self.assertEqual((ta2.value(), len(cluster.bus.messages)), (b"", 4), "three joins, one line")

    def test_senderOrderAcrossReadsAndNodes(self) -> None:
        """Each sender's lines arrive on other nodes in the order they were sent, across many reads and three nodes."""
        cluster = Cluster(nodes=3)
        a, _ = cluster.connect(0)
        b, _ = cluster.connect(1)
        _, tc = cluster.connect(2)
        cluster.takeAll()
        for i in range(50):
            a.dataReceived(b"a%d\n" % i)
            b.dataReceived(b"b%d\nb%d-more\n" % (i, i))
            if i % 7 == 0:
                cluster.settle()
        cluster.settle()
        got = tc.take().splitlines()
        self.assertEqual([line for line in got if line.startswith(b"<127.0.0.1:40001>")],
                         [b"<127.0.0.1:40001> a%d" % i for i in range(50)])
        self.assertEqual([line for line in got if line.startswith(b"<127.0.0.1:40002>")],
                         [b"<127.0.0.1:40002> b%d%s" % (i, s) for i in range(50) for s in (b"", b"-more")])

    def test_oneMessagePerReactorTurn(self) -> None:
        """What a node's clients send in one reactor turn is one message on the channel."""
        cluster = Cluster()
        clients = [cluster.connect(0)[0] for _ in range(20)]
        _, tb = cluster.connect(1)
        cluster.takeAll()
        before = len(cluster.bus.messages)
        for client in clients:
            client.dataReceived(b"storm\n")
        cluster.settle()
        self.assertEqual(len(cluster.bus.messages), before + 1)
        self.assertEqual(tb.take().count(b"> storm\n"), 20)
        self.assertEqual(len(tb.writes), 0, "take() cleared them")

    def test_duplicatesAreDeliveredOnce(self) -> None:
        """A message the store delivers several times reaches clients once, and the duplicates are counted."""
        cluster = Cluster()
        cluster.bus.copies = 3
        a, _ = cluster.connect(0)
        _, tb = cluster.connect(1)
        cluster.takeAll()
        a.dataReceived(b"once\n")
        cluster.settle()
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> once\n")
        self.assertGreaterEqual(cluster.backplane(1).stats.duplicates, 2)

    def test_namesWhoAndNoticesAcrossNodes(self) -> None:
        """Welcomes, joins, renames, name clashes, /who and leaves all count and show clients on every node."""
        cluster = Cluster()
        a, ta = cluster.connect(0)
        ta.take()
        b, tb = cluster.connect(1)
        self.assertEqual(tb.take().splitlines(), [b"* welcome, you are 127.0.0.1:40002 (2 connected; /help lists the "
                                                  b"commands)"])
        self.assertEqual(ta.take(), b"* 127.0.0.1:40002 joined\n")
        a.dataReceived(b"/nick Alice\n")
        self.assertEqual(ta.take(), b"/nick Alice\n* you are now Alice\n")
        cluster.settle()
        self.assertEqual(tb.take(), b"* 127.0.0.1:40001 is now Alice\n")
        b.dataReceived(b"/nick alice\n/nick bob\n/who\n")
        self.assertEqual(tb.take().splitlines()[1::2], [b"* error: the name alice is taken, choose another",
                                                        b"* you are now bob", b"* 2 connected: bob, Alice"])
        cluster.settle()
        a.dataReceived(b"/who\n")
        self.assertEqual(ta.take(), b"* 127.0.0.1:40002 is now bob\n/who\n* 2 connected: Alice, bob\n")
        b.connectionLost(Failure(ConnectionDone()))
        cluster.settle()
        self.assertEqual(ta.take(), b"* bob left\n")
        self.assertEqual(cluster.backplane(0).remoteCount(), 0)

    def test_defaultNameTakenElsewhereGetsASuffix(self) -> None:
        """A default name already in use on another node gets a #1 suffix."""
        cluster = Cluster()
        cluster.connect(0)
        cluster.nextPort -= 1
        client, _ = cluster.connect(1)
        self.assertEqual(client.name, "127.0.0.1:40001#1")

    def test_noticeLimitCountsEveryNode(self) -> None:
        """The join notice limit counts the clients of the whole room, on every node."""
        cluster = Cluster(noticeLimit=2)
        _, ta = cluster.connect(0)
        cluster.connect(1)
        cluster.connect(1)
        self.assertEqual(ta.take().count(b"joined"), 1, "the third client is over the limit of the room")
        self.assertEqual(cluster.hubs[0].population(), 3)

    def test_storeDownLocalClientsStillServedNothingQueued(self) -> None:
        """While the store is down, clients on the same node still get every line, lines for other nodes are dropped
        and counted rather than queued, and delivery resumes when it is back."""
        cluster = Cluster()
        a, ta = cluster.connect(0)
        _, ta2 = cluster.connect(0)
        _, tb = cluster.connect(1)
        cluster.takeAll()
        cluster.bus.up = False
        for i in range(100):
            a.dataReceived(b"down %d\n" % i)
        cluster.settle()
        self.assertEqual(ta2.take().count(b"> down "), 100)
        self.assertEqual(ta.take().count(b"down "), 100)
        self.assertEqual(tb.take(), b"")
        node = cluster.backplane(0)
        self.assertEqual((node.stats.dropped, node._frames), (100, []), "dropped and counted, not queued")
        cluster.bus.up = True
        a.dataReceived(b"up again\n")
        cluster.settle()
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> up again\n")

    def test_slowRemoteReaderIsDroppedAsBefore(self) -> None:
        """Lines from other nodes go through the same send queue: a client that does not read is
        dropped when they pass --send-queue, and the others get everything."""
        cluster = Cluster(sendQueue=10_000)
        a, _ = cluster.connect(0)
        slow, tslow = cluster.connect(1)
        _, tok = cluster.connect(1)
        cluster.takeAll()
        assert slow.queue is not None
        slow.queue.pauseProducing()
        line = b"x" * 999 + b"\n"
        for _ in range(20):
            a.dataReceived(line)
            cluster.settle()
        self.assertTrue(tslow.disconnecting)
        self.assertIn(b"* too slow: over 10000 bytes", tslow.take())
        self.assertEqual(tok.take().replace(b"* 127.0.0.1:40002 left (too slow)\n", b"").count(line), 20)
        cluster.settle()
        self.assertEqual(cluster.backplane(0).remoteCount(), 1, "the slow one left the room everywhere")

    def test_shutdownSaysGoodbyeEverywhere(self) -> None:
        """A node that shuts down has its clients shown as left on other nodes, and a stale snapshot does not bring
        them back."""
        cluster = Cluster()
        a, _ = cluster.connect(0)
        a.dataReceived(b"/nick ghost\n")
        _, tb = cluster.connect(1)
        cluster.takeAll()
        cluster.hubs[0].shutdown()
        cluster.backplane(0)._queue(bpwire.encodeFrame(bpwire.BYE), 0)
        cluster.settle()
        self.assertEqual(tb.take(), b"* ghost left (server shutting down)\n")
        self.assertEqual(cluster.hubs[1].who(), b"* 1 connected: 127.0.0.1:40002\n")
        self.assertTrue(cluster.backplane(1).remotes["node0"].gone)
        cluster.backplane(1).applySnapshot("node0", bpwire.encodeSnapshot(99, ["ghost"]))
        self.assertEqual(cluster.backplane(1).remoteCount(), 0, "a stale snapshot does not bring it back")

    def test_malformedMessagesAreCountedAndLoggedOnce(self) -> None:
        """Messages on the channel that are not from tcplab-multi are counted, and logged only once per node."""
        cluster = Cluster()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for data in (b"garbage", b"TLB\x01\x02n1", b"hello"):
            cluster.bus.publish(data)
        self.assertEqual(cluster.backplane(0).stats.malformed, 3)
        self.assertEqual(len([e for e in events if "not from tcplab-multi" in e.get("log_format", "")]), 2,
                         "one line per node")


class PresenceTests(unittest.TestCase):
    def node(self) -> FakeBackplane:
        return FakeBackplane(FakeBus(), Clock(), "me")

    def message(self, seq: int, *frames: bytes, node: str = "other") -> bytes:
        return bpwire.encodeEnvelope(node, seq, frames)

    def test_snapshotOlderThanEventsIsIgnored(self) -> None:
        """A presence snapshot older than the events already seen is ignored, a newer one replaces them, and later
        events apply on top."""
        node = self.node()
        node.received(self.message(1, bpwire.encodeFrame(bpwire.JOIN, "a")))
        node.received(self.message(2, bpwire.encodeFrame(bpwire.JOIN, "b")))
        node.applySnapshot("other", bpwire.encodeSnapshot(1, ["a"]))
        self.assertEqual(list(node.remoteNames()), ["a", "b"])
        node.applySnapshot("other", bpwire.encodeSnapshot(5, ["a", "c"]))
        self.assertEqual((list(node.remoteNames()), node.remoteCount()), (["a", "c"], 2))
        node.received(self.message(4, bpwire.encodeFrame(bpwire.PART, "a"),
                                   bpwire.encodeFrame(bpwire.LINES, "x", "", b"late\n")))
        self.assertEqual(list(node.remoteNames()), ["a", "c"], "already in the snapshot")
        node.received(self.message(6, bpwire.encodeFrame(bpwire.NICK, "c", "Cat")))
        self.assertEqual((list(node.remoteNames()), node.isTaken("CAT")), (["a", "Cat"], True))

    def test_gapsAreCountedAndAskForPresence(self) -> None:
        """Missed messages from a node are counted and make the hub read that node's presence again."""
        node = self.node()
        node.received(self.message(3, bpwire.encodeFrame(bpwire.JOIN, "a")))
        self.assertEqual(node.presenceWanted, 1, "joined a node in mid-stream: read its presence")
        node.received(self.message(7, bpwire.encodeFrame(bpwire.HELLO)))
        self.assertEqual((node.stats.missed, node.presenceWanted), (3, 2))

    def test_deadNodesAreForgottenAfterTheirExpiry(self) -> None:
        """A node is forgotten only once its presence key has gone and it has been silent past its TTL, so its
        clients stop being counted."""
        node = self.node()
        clock: Clock = node.clock  # type: ignore[assignment]
        node.received(self.message(1, bpwire.encodeFrame(bpwire.JOIN, "a")))
        node.applySnapshot("quiet", bpwire.encodeSnapshot(0, ["q"]))
        self.assertEqual(node.presenceRead({"other": None, "quiet": bpwire.encodeSnapshot(0, ["q"]), "me": b"0"}),
                         ["other"])
        self.assertEqual(node.remoteCount(), 2, "heard from just now: not yet")
        clock.advance(16)
        node.presenceRead({"quiet": bpwire.encodeSnapshot(0, ["q"])})
        self.assertEqual(list(node.remoteNames()), ["q"], "still in the store: kept")
        node.presenceRead({})
        self.assertEqual((node.remoteCount(), node.remotes), (0, {}), "its key expired, and it sent nothing")


class FakeRedisConnection:
    """Stands for one txredisapi connection: records the commands; PUBLISH waits for ``answer``."""

    def __init__(self, node: bpredis.RedisBackplane) -> None:
        self.factory = SimpleNamespace(backplane=node)
        self.connected = True
        self.commands: list[tuple[Any, ...]] = []
        self.unanswered: list[defer.Deferred[object]] = []

    def _command(self, *args: Any, result: object = None) -> defer.Deferred[object]:
        self.commands.append(args)
        return defer.succeed(result)

    def publish(self, channel: str, message: bytes) -> defer.Deferred[object]:
        self.commands.append(("PUBLISH", channel, message))
        d: defer.Deferred[object] = defer.Deferred()
        self.unanswered.append(d)
        return d

    def answer(self) -> None:
        waiting, self.unanswered = self.unanswered, []
        for d in waiting:
            d.callback(1)

    def published(self) -> list[bpwire.Envelope]:
        return [bpwire.decodeEnvelope(c[2]) for c in self.commands if c[0] == "PUBLISH"]

    def subscribe(self, channel: str) -> defer.Deferred[object]:
        return self._command("SUBSCRIBE", channel)

    def ping(self) -> defer.Deferred[object]:
        return self._command("PING")

    def set(self, key: str, value: bytes, pexpire: int) -> defer.Deferred[object]:
        return self._command("SET", key, value, pexpire)

    def sadd(self, key: str, member: str) -> defer.Deferred[object]:
        return self._command("SADD", key, member)

    def srem(self, key: str, members: object) -> defer.Deferred[object]:
        return self._command("SREM", key, members)

    def delete(self, key: str) -> defer.Deferred[object]:
        return self._command("DEL", key)

    def execute_command(self, *args: object) -> defer.Deferred[object]:
        return self._command(*args)

    def smembers(self, key: str) -> defer.Deferred[object]:
        return self._command("SMEMBERS", key, result=[])

    def mget(self, keys: list[str]) -> defer.Deferred[object]:
        return self._command("MGET", keys, result=[])


class LifecycleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.node = bpredis.RedisBackplane(bpredis.RedisAddress("127.0.0.1", 6399), "room", self.clock, nodeId="me",
                                           maxUnanswered=300)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in e.get("log_format", "")]

    def send(self, line: bytes) -> None:
        self.node.publish(line, "alice")
        self.clock.advance(0)

    def connect(self) -> tuple[FakeRedisConnection, FakeRedisConnection]:
        commands, subscriber = FakeRedisConnection(self.node), FakeRedisConnection(self.node)
        self.node._commandsReady(commands)
        self.node._subscriberReady(subscriber)
        return commands, subscriber

    def test_everyStateAndItsLogLines(self) -> None:
        """Down at start, up, congested, an outage and back, stopped: each change is logged once, and lines
        leave only while both connections are ready and Redis keeps up."""
        node, refused = self.node, Failure(ConnectionRefusedError())
        up = node.whenUp()
        self.assertEqual((node.lifecycle(), node.state()), ("connecting", "DOWN (serving this server's clients only)"))
        node._attemptFailed(refused)
        node._attemptFailed(refused)
        self.assertEqual((node.lifecycle(), len(self.logged("cannot reach Redis"))), ("unreachable", 1))

        commands = FakeRedisConnection(node)
        node._commandsReady(commands)
        self.send(b"early\n")
        self.assertEqual((node.lifecycle(), commands.published(), node.stats.dropped), ("unreachable", [], 1),
                         "the subscriber is not ready yet: dropped, not sent")
        subscriber = FakeRedisConnection(node)
        node._subscriberReady(subscriber)
        self.assertEqual((node.lifecycle(), node.state(), self.successResultOf(up)), ("up", "up", None))
        self.assertEqual(len(self.logged("connected to Redis")), 1)
        self.assertEqual(subscriber.commands[0], ("SUBSCRIBE", "room"))
        [hello] = commands.published()
        self.assertEqual([f.kind for f in hello.frames], [bpwire.HELLO])
        self.assertIn(("SET", "room:node:me", b"1", 15000), commands.commands)

        self.send(b"x" * 400 + b"\n")
        self.send(b"y" * 400 + b"\n")
        self.assertEqual((node.lifecycle(), node.state(), node.stats.dropped), ("congested", "up", 3))
        self.assertEqual(len(self.logged("is not keeping up")), 1)
        commands.answer()
        self.send(b"answered\n")
        self.assertEqual((node.lifecycle(), len(self.logged("keeps up again"))), ("up", 1))
        self.assertEqual(commands.published()[-1].frames[0].payload, b"answered\n")

        node._lost(subscriber, Failure(ConnectionDone()))
        self.send(b"lost\n")
        node._attemptFailed(refused)
        node._lost(commands, Failure(ConnectionDone()))
        self.assertEqual((node.lifecycle(), node.up, node.unanswered), ("outage", False, 0))
        self.assertEqual((len(self.logged("lost Redis")), len(self.logged("cannot reach Redis"))), (1, 1))
        self.clock.advance(3)
        commands, _ = self.connect()
        [back] = self.logged("is back after")
        self.assertEqual((node.lifecycle(), back["seconds"], back["dropped"]), ("up", 3.0, 1))
        self.assertEqual([f.kind for f in commands.published()[0].frames], [bpwire.HELLO])

        stopped = node.stop()
        self.assertEqual([f.kind for f in commands.published()[-1].frames], [bpwire.BYE])
        self.assertIn(("DEL", "room:node:me"), commands.commands)
        self.assertIn(("SREM", "room:nodes", "me"), commands.commands)
        self.successResultOf(stopped)
        self.assertEqual((node.lifecycle(), node.state(), node.up), ("stopped", "stopped", False))
        node._attemptFailed(refused)
        self.send(b"after\n")
        self.assertEqual((len(self.logged("cannot reach Redis")), commands.published()[-1].frames[0].kind),
                         (1, bpwire.BYE), "a stopped node logs and sends nothing")

    def test_stopWhileWaitingForRedis(self) -> None:
        """Stopping a node that never reached Redis cancels whoever waits for it and sends nothing."""
        waiting = self.node.whenUp()
        self.successResultOf(self.node.stop())
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.node.lifecycle(), "stopped")


# -- real Redis


REDIS = shutil.which("redis-server")
try:
    import txredisapi  # noqa: F401
except ImportError:
    TXREDISAPI = False
else:
    TXREDISAPI = True


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


class RedisServer:
    """A private ``redis-server`` on a free loopback port, in a temporary folder, no persistence."""

    def __init__(self) -> None:
        self.port = freePort()
        self.folder = tempfile.mkdtemp(prefix="tcplab-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.folder],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisMixin:
    addCleanup: Callable[..., None]

    def setUp(self) -> None:
        if REDIS is None:
            raise unittest.SkipTest("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        if not TXREDISAPI:
            raise unittest.SkipTest("txredisapi is not installed (pip install txredisapi)")
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def startNode(self, *argv: str) -> multitap.HubService:
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "0",
                              "--backplane", self.redis.url, "--channel", "test", *argv])
        service = multitap.HubService(options, reactor)
        assert service.backplane is not None
        service.backplane.initialDelay, service.backplane.maxDelay = 0.1, 0.5
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def connect(self, service: multitap.HubService, count: int = 1) -> list[LineClient]:
        port = service.listening.ports[0].getHost().port
        return [await connectTo(port) for _ in range(count)]

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in e.get("log_format", "")]


async def connectTo(port: int) -> LineClient:
    client = LineClient()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client))
    await client.waitFor(lambda c: bool(c.lines))
    return client


async def closeAll(clients: list[LineClient]) -> None:
    for c in clients:
        c.transport.loseConnection()
    await defer.gatherResults([c.lost for c in clients])


async def waitUntil(condition: Callable[[], bool], seconds: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``condition`` (state that has no event to wait on, such as presence expiring), bounded in time."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, interval, lambda: None)


async def waitForWho(client: LineClient, start: bytes, seconds: float = 10.0) -> None:
    """Ask /who until the reply starts with ``start``: what a server knows of the others' clients
    is eventually consistent (presence is read from Redis every few seconds)."""

    def ask() -> bool:
        if any(line.startswith(start) for line in client.lines):
            return True
        client.transport.write(b"/who\n")
        return False

    await waitUntil(ask, seconds, interval=0.1)


def assertEveryLineOnceInOrder(test: unittest.TestCase, clients: list[LineClient],
                               sent: dict[str, list[bytes]]) -> None:
    for c in clients:
        got = chatLines(c)
        for other in clients:
            if other is c:
                continue
            prefix = f"<{other.name}> ".encode()
            test.assertEqual([line[len(prefix):] for line in got if line.startswith(prefix)], sent[other.name])


class RedisBackplaneTests(RedisMixin, unittest.TestCase):
    def test_twoNodesBehaveAsOneRoom(self) -> defer.Deferred[None]:
        """Three clients on each of two nodes each send 30 lines in a few writes: every client gets
        every other client's lines once, in order; /who, joins and renames cover both nodes."""
        a, b = self.startNode(), self.startNode()

        async def run() -> None:
            await defer.gatherResults([a.backplane.whenUp(), b.backplane.whenUp()])  # type: ignore[union-attr]
            clients = await self.connect(a, 3) + await self.connect(b, 3)
            sent = {c.name: [f"{c.name} line {i} \u00e9".encode() for i in range(30)] for c in clients}
            for c in clients:
                lines = sent[c.name]
                for start in range(0, 30, 8):
                    c.transport.write(b"".join(line + b"\n" for line in lines[start:start + 8]))
            expected = 6 * 30
            await defer.gatherResults([c.waitFor(lambda c: len(chatLines(c)) >= expected) for c in clients])
            assertEveryLineOnceInOrder(self, clients, sent)
            for c in clients:
                self.assertEqual(len(chatLines(c)), expected, "nothing twice")
            last = clients[-1]
            last.transport.write(b"/nick zed\n")
            await clients[0].waitFor(lambda c: f"* {last.name} is now zed".encode() in c.lines)
            await waitForWho(clients[0], b"* 6 connected: ")
            who = next(line for line in clients[0].lines if line.startswith(b"* 6 connected: "))
            self.assertEqual(set(who[len(b"* 6 connected: "):].split(b", ")),
                             {c.name.encode() for c in clients[:5]} | {b"zed"})
            await closeAll(clients)

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_redisKilledAndRestarted(self) -> defer.Deferred[None]:
        """While Redis is down each node serves its own clients and logs it once; once Redis is back
        (restarted, empty), lines cross again and /who is whole again."""
        a, b = self.startNode(), self.startNode()

        async def run() -> None:
            await defer.gatherResults([a.backplane.whenUp(), b.backplane.whenUp()])  # type: ignore[union-attr]
            a1, a2 = await self.connect(a, 2)
            [b1] = await self.connect(b)
            self.redis.kill()
            await waitUntil(lambda: not a.backplane.up and not b.backplane.up)  # type: ignore[union-attr]
            for i in range(50):
                a1.transport.write(b"alone %d\n" % i)
            b1.transport.write(b"also alone\n")
            await a2.waitFor(lambda c: f"<{a1.name}> alone 49".encode() in c.lines)
            await b1.waitFor(lambda c: b"also alone" in c.lines)
            self.assertEqual(len(self.logged("backplane: lost Redis")), 2, "one line per node, not per line")
            self.redis.start()
            await defer.gatherResults([a.backplane.whenUp(), b.backplane.whenUp()])  # type: ignore[union-attr]
            self.assertEqual(len(self.logged("is back after")), 2)
            a1.transport.write(b"back\n")
            await b1.waitFor(lambda c: f"<{a1.name}> back".encode() in c.lines)
            self.assertNotIn(f"<{a1.name}> alone".encode(), b"".join(b1.lines), "what was not sent is gone, not late")
            self.assertEqual(a.backplane.stats.dropped, 50)  # type: ignore[union-attr]
            await waitForWho(b1, b"* 3 connected: ")
            await closeAll([a1, a2, b1])

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_redisDownAtStart(self) -> defer.Deferred[None]:
        """A hub started while Redis is down still serves its own clients, logs the outage once, and joins the
        backplane when Redis comes up."""
        self.redis.kill()
        a = self.startNode()

        async def run() -> None:
            [a1] = await self.connect(a)
            self.assertTrue(a1.lines[0].startswith(b"* welcome"))
            await waitUntil(lambda: bool(self.logged("cannot reach Redis")))
            self.redis.start()
            await a.backplane.whenUp()  # type: ignore[union-attr]
            self.assertEqual(len(self.logged("cannot reach Redis")), 1)
            await closeAll([a1])

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)


    def test_stopWhileRedisIsDown(self) -> defer.Deferred[None]:
        """Nothing is left behind (trial checks the reactor is clean)."""
        self.redis.kill()
        node = self.startNode()

        async def run() -> None:
            await waitUntil(lambda: bool(self.logged("cannot reach Redis")))
            await node.stopService()

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)

    def test_redisNotAnsweringBoundsWhatWaits(self) -> defer.Deferred[None]:
        """A Redis that accepts but does not answer (stopped with SIGSTOP) gets at most --max-unanswered
        bytes; the rest is dropped and counted, with one log line, and sending resumes when it answers."""
        a, b = self.startNode(), self.startNode()
        assert a.backplane is not None and b.backplane is not None
        a.backplane.maxUnanswered = 20_000
        assert self.redis.process is not None
        process = self.redis.process
        self.addCleanup(lambda: process.send_signal(signal.SIGCONT) if process.poll() is None else None)

        async def run() -> None:
            await defer.gatherResults([a.backplane.whenUp(), b.backplane.whenUp()])  # type: ignore[union-attr]
            [a1, a2] = await self.connect(a, 2)
            [b1] = await self.connect(b)
            process.send_signal(signal.SIGSTOP)
            line = b"y" * 999
            for i in range(60):
                a1.transport.write(b"%d %s\n" % (i, line))
            await a2.waitFor(lambda c: any(x.startswith(f"<{a1.name}> 59 ".encode()) for x in c.lines))
            node = a.backplane
            assert node is not None
            self.assertLessEqual(node.unanswered, 20_000)
            self.assertGreater(node.stats.dropped, 0)
            self.assertEqual(len(self.logged("is not keeping up")), 1)
            process.send_signal(signal.SIGCONT)
            await waitUntil(lambda: node.unanswered == 0)
            a1.transport.write(b"answered\n")
            await b1.waitFor(lambda c: f"<{a1.name}> answered".encode() in c.lines)
            self.assertEqual(len(self.logged("keeps up again")), 1)
            got = [x for x in b1.lines if x.startswith(f"<{a1.name}> ".encode())]
            self.assertEqual(len(got), 60 - node.stats.dropped + 1, "each line once or not at all")
            numbers = [int(x.split()[1]) for x in got[:-1]]
            self.assertEqual(numbers, sorted(numbers), "in the sender's order")
            await closeAll([a1, a2, b1])

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT, reactor)


class ReusePortProcessTests(RedisMixin, unittest.TestCase):
    def test_twoProcessesOnePort(self) -> defer.Deferred[None]:
        """``twistd -n tcplab-multi --reuse-port --backplane ...`` twice on one port: the kernel spreads
        the clients, and they are one room; when one process dies (SIGKILL), its clients vanish from
        /who elsewhere once its presence expires."""
        argv = ["--interface", "127.0.0.1", "--reuse-port", "--backplane", self.redis.url, "--presence-ttl", "1",
                "--stats-interval", "0"]
        first = ServerProcess("tcplab-multi", "--port", "0", *argv)
        self.addCleanup(first.stop)
        second = ServerProcess("tcplab-multi", "--port", str(first.port), *argv)
        self.addCleanup(second.stop)
        self.assertEqual(second.port, first.port)
        for server in (first, second):
            assert server.process.stdout is not None
            os.set_blocking(server.process.stdout.fileno(), False)

        def read(server: ServerProcess) -> str:
            assert server.process.stdout is not None
            data = server.process.stdout.read()
            server.log.append(data.decode("utf-8", "replace") if data else "")
            return "".join(server.log)

        async def run() -> None:
            await waitUntil(lambda: all("backplane: connected" in read(s) for s in (first, second)))
            clients = [await connectTo(first.port) for _ in range(16)]
            await waitUntil(lambda: all(f"{c.name} joined" in read(first) + read(second) for c in clients))
            onFirst = [c for c in clients if f"{c.name} joined" in read(first)]
            onSecond = [c for c in clients if c not in onFirst]
            self.assertTrue(onFirst and onSecond, "the kernel spreads connections over both processes")
            await waitForWho(clients[-1], b"* 16 connected: ")
            sent = {c.name: [f"from {c.name}".encode()] for c in clients}
            for c in clients:
                c.transport.write(sent[c.name][0] + b"\n")
            await defer.gatherResults([c.waitFor(lambda c: len([x for x in chatLines(c) if x.startswith(b"<")]) >= 15)
                                       for c in clients])
            assertEveryLineOnceInOrder(self, clients, sent)
            first.process.send_signal(signal.SIGKILL)
            await defer.gatherResults([c.lost for c in onFirst])
            await waitForWho(onSecond[0], f"* {len(onSecond)} connected: ".encode(), 8)
            await closeAll(onSecond)

        return defer.Deferred.fromCoroutine(run()).addTimeout(TIMEOUT + 10, reactor)
