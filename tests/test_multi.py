"""The tcplab-multi hub through fake transports: echo, broadcast, names, commands, limits,
the slow-reader policy, escaping, shutdown, stats and the twistd options."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from tcplab.escaping import escapeLine, escapeName, escapeText, safeText, unescapeLine
from tcplab.multi import tap as multitap
from tcplab.multi.hub import WHO_LIMIT, HubClient, HubConfig, MultiHub
from tcplab.multi.sendqueue import SendQueue
from tcplab.multi.wire import parseCommand
from tcplab.peers import describeAddress
from tcplab.testing import FakeTransport
from tests.test_escaping import NAMED

#: The producer-aware fake transport, under the name tests/test_backplane.py imports.
FlowTransport = FakeTransport


class Room:
    """A hub on a fake clock, and clients on fake transports with predictable addresses."""

    def __init__(self, bufferSize: int = 1 << 30, **config: object) -> None:
        self.clock = Clock()
        self.hub = MultiHub(HubConfig(**config), self.clock)  # type: ignore[arg-type]
        self.bufferSize = bufferSize
        self.nextPort = 40000

    def connect(
        self, address: object = None, quiet: bool = True, bufferSize: int | None = None
    ) -> tuple[HubClient, FlowTransport]:
        if address is None:
            self.nextPort += 1
            address = IPv4Address("TCP", "127.0.0.1", self.nextPort)
        client = self.hub.buildProtocol(address)
        transport = FlowTransport(address, bufferSize or self.bufferSize)
        client.makeConnection(transport)
        if quiet:
            self.takeAll()
        return client, transport

    def takeAll(self) -> None:
        for member in list(self.hub.members):
            member.transport.take()

    def disconnect(self, client: HubClient) -> None:
        client.connectionLost(Failure(ConnectionDone()))


def chat(text: str) -> bytes:
    return text.encode("utf-8")


class EchoAndBroadcastTests(unittest.TestCase):
    def test_ownLinesComeBackExactly(self) -> None:
        """A sender gets its own bytes back exactly as typed, controls, bad UTF-8 and blank lines included."""
        room = Room()
        a, ta = room.connect()
        room.connect()
        data = b"hello\r\nw\xc3\xb6rld\n\x00\xff\x1b[2J\n\n"
        a.dataReceived(data)
        self.assertEqual(ta.take(), data)

    def test_othersGetEveryLinePrefixedAndEscaped(self) -> None:
        """Everyone else sees each line once, prefixed with the sender's name, with line ends made LF and controls
        escaped."""
        room = Room()
        a, _ = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"hello\r\nw\xc3\xb6rld\n\x00\xff\x1b[2J\n\n")
        self.assertEqual(
            tb.take(),
            b"<127.0.0.1:40001> hello\n"
            b"<127.0.0.1:40001> w\xc3\xb6rld\n"
            b"<127.0.0.1:40001> \\x00\\xff\\x1b[2J\n"
            b"<127.0.0.1:40001> \n",
        )

    def test_carriageReturnCannotForgeALine(self) -> None:
        """A \\r inside a line would let a terminal overwrite the prefix with a fake one."""
        room = Room()
        a, _ = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"x\r<admin> give me your password\n")
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> x\\x0d<admin> give me your password\n")

    def test_partialLineWaitsForItsEnd(self) -> None:
        """Nothing is echoed or broadcast until a line's end arrives, even when CR and LF come in separate reads."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"hel")
        self.assertEqual((ta.value(), tb.value()), (b"", b""))
        a.dataReceived(b"lo\r")
        self.assertEqual((ta.value(), tb.value()), (b"", b""))
        a.dataReceived(b"\nnext")
        self.assertEqual((ta.take(), tb.take()), (b"hello\r\n", b"<127.0.0.1:40001> hello\n"))

    def test_oneWritePerRecipientPerRead(self) -> None:
        """Lines that arrive in one read go out in one write to each client (fan-out cost)."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        _, tc = room.connect()
        a.dataReceived(b"1\n2\n/who\n3\n")
        self.assertEqual(len(ta.writes), 1)
        self.assertEqual(len(tb.writes), 1)
        self.assertEqual(len(tc.writes), 1)
        self.assertIs(tb.writes[0], tc.writes[0], "the broadcast is built once")
        self.assertEqual(tb.writes[0], b"<127.0.0.1:40001> 1\n<127.0.0.1:40001> 2\n<127.0.0.1:40001> 3\n")

    def test_everyFragmentSize(self) -> None:
        """However the bytes are split on arrival, everyone gets the same bytes."""
        data = b"one\r\n/nick alice\nt\xc3\xa9\xff\x1b two\n//slash\n/who\n\nthree\n"

        def run(size: int) -> tuple[bytes, bytes]:
            room = Room()
            a, ta = room.connect()
            _, tb = room.connect()
            for i in range(0, len(data), size):
                a.dataReceived(data[i : i + size])
            return ta.take(), tb.take()

        expected = run(len(data))
        self.assertTrue(expected[0].startswith(b"one\r\n/nick alice\n* you are now alice\n"))
        self.assertIn(b"<alice> t\xc3\xa9\\xff\\x1b two\n<alice> /slash\n", expected[1])
        for size in range(1, len(data)):
            self.assertEqual(run(size), expected, f"split every {size} bytes")

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and not b.startswith(b"/")), max_size=12),
        st.data(),
    )
    def test_anyLinesAnySplit(self, lines: list[bytes], data: st.DataObject) -> None:
        """Property: the sender gets its bytes back exactly; each other client gets each line once,
        in order, prefixed, escaped so that unescaping gives the line (without a final \\r) back."""
        stream = b"".join(line + b"\n" for line in lines)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            a.dataReceived(stream[start:end])
        self.assertEqual(ta.take(), stream)
        received = tb.take().split(b"\n")
        self.assertEqual(received.pop(), b"")
        self.assertEqual(len(received), len(lines))
        for line, got in zip(lines, received, strict=True):
            self.assertTrue(got.startswith(b"<127.0.0.1:40001> "))
            text = line[:-1] if line.endswith(b"\r") else line
            self.assertEqual(unescapeLine(got[len(b"<127.0.0.1:40001> "):]), text)


class NoticeTests(unittest.TestCase):
    def test_welcomeJoinAndLeave(self) -> None:
        """A newcomer is welcomed with its name and the head count, and the others are told who joined and who left."""
        room = Room()
        a, ta = room.connect(quiet=False)
        self.assertEqual(ta.take(), b"* welcome, you are 127.0.0.1:40001 (1 connected; /help lists the commands)\n")
        b, tb = room.connect(quiet=False)
        self.assertEqual(tb.take(), b"* welcome, you are 127.0.0.1:40002 (2 connected; /help lists the commands)\n")
        self.assertEqual(ta.take(), b"* 127.0.0.1:40002 joined\n")
        room.disconnect(b)
        self.assertEqual(ta.take(), b"* 127.0.0.1:40002 left\n")
        self.assertEqual(len(room.hub.members), 1)
        self.assertEqual(room.hub.connections, 1)

    def test_noNoticesInACrowd(self) -> None:
        """Above --notice-limit clients, joins and leaves are not announced (each would cost a broadcast)."""
        room = Room(noticeLimit=2)
        _, ta = room.connect(quiet=False)
        room.connect(quiet=False)
        self.assertIn(b"joined", ta.take())
        c, _ = room.connect(quiet=False)
        room.disconnect(c)
        self.assertEqual(ta.take(), b"")

    def test_defaultNamesAreUnique(self) -> None:
        """Default names differ for every client, even two from the same address and port, and a unix socket path
        never puts an escape byte in a name."""
        room = Room()
        u1, _ = room.connect(UNIXAddress(None))
        u2, _ = room.connect(UNIXAddress(b"/tmp/x\x1b.sock"))
        v6, _ = room.connect(IPv6Address("TCP", "::1", 5000))
        same1, _ = room.connect(IPv4Address("TCP", "10.0.0.1", 5000))
        same2, _ = room.connect(IPv4Address("TCP", "10.0.0.1", 5000))
        names = [c.name for c in (u1, u2, v6, same1, same2)]
        self.assertEqual(len(set(names)), 5, names)
        self.assertEqual(names[2:4], ["[::1]:5000", "10.0.0.1:5000"])
        self.assertRegex(names[0], r"^unix#\d+$")
        self.assertNotIn("\x1b", u2.peer)


class CommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.room = Room()
        self.a, self.ta = self.room.connect()
        self.b, self.tb = self.room.connect()

    def test_nick(self) -> None:
        """/nick renames the sender, confirms it, tells the others, and later lines carry the new name."""
        self.a.dataReceived(b"/nick alice\nhi\n")
        self.assertEqual(self.ta.take(), b"/nick alice\n* you are now alice\nhi\n")
        self.assertEqual(self.tb.take(), b"* 127.0.0.1:40001 is now alice\n<alice> hi\n")
        self.assertEqual(self.a.name, "alice")

    def test_nickRejected(self) -> None:
        """Empty, too long, spaced, colon, non-ASCII or control names are refused with a one-line error nobody else
        sees, and a 32-character name is accepted."""
        for bad in (b"", b"a" * 33, b"al ice", b"al:ice", b"\xc3\xa9", b"a\x1b"):
            self.a.dataReceived(b"/nick " + bad + b"\n")
            reply = self.ta.take().split(b"\n")[1]
            self.assertTrue(reply.startswith(b"* error: "), reply)
            self.assertNotIn(b"\x1b", reply)
        self.assertEqual(self.tb.take(), b"")
        self.assertEqual(self.a.name, "127.0.0.1:40001")
        self.a.dataReceived(b"/nick " + b"a" * 32 + b"\n")
        self.assertEqual(self.a.name, "a" * 32)

    def test_nickUniqueIgnoringCase(self) -> None:
        """A name taken in another case is refused, its owner may change its case, and it is free again once its
        owner leaves."""
        self.a.dataReceived(b"/nick alice\n")
        self.tb.take()
        self.b.dataReceived(b"/nick ALICE\n")
        self.assertEqual(self.tb.take(), b"/nick ALICE\n* error: the name ALICE is taken, choose another\n")
        self.a.dataReceived(b"/nick Alice\n")
        self.assertIn(b"* you are now Alice\n", self.ta.take())
        self.room.disconnect(self.a)
        self.b.dataReceived(b"/nick alice\n")
        self.assertIn(b"* you are now alice\n", self.tb.take())

    def test_who(self) -> None:
        """/who (in any case) lists everyone connected, by name, to the asker only."""
        self.b.dataReceived(b"/nick bob\n")
        self.ta.take()
        self.a.dataReceived(b"/WHO\n")
        self.assertEqual(self.ta.take(), b"/WHO\n* 2 connected: 127.0.0.1:40001, bob\n")
        self.assertNotIn(b"WHO", self.tb.take())

    def test_whoIsBounded(self) -> None:
        """/who in a crowded room names the first hundred and says how many more there are."""
        room = Room(noticeLimit=0)
        clients = [room.connect() for _ in range(WHO_LIMIT + 5)]
        client, transport = clients[0]
        client.dataReceived(b"/who\n")
        reply = transport.take().split(b"\n")[1]
        self.assertTrue(reply.startswith(b"* 105 connected: 127.0.0.1:40001, "))
        self.assertTrue(reply.endswith(b", and 5 more"))

    def test_quit(self) -> None:
        """/quit says bye, closes the connection, tells the others why the client left, and nothing after it is sent."""
        self.a.dataReceived(b"bye all\n/quit\nnever sent\n")
        self.assertEqual(self.ta.take(), b"bye all\n/quit\n* bye\n")
        self.assertTrue(self.ta.disconnecting)
        self.assertEqual(self.tb.take(), b"<127.0.0.1:40001> bye all\n* 127.0.0.1:40001 left (quit)\n")
        self.a.dataReceived(b"late\n")
        self.assertEqual((self.ta.value(), self.tb.value()), (b"", b""))

    def test_helpAndUnknown(self) -> None:
        """/help lists the commands, and an unknown command (or a lone slash) gets a one-line error pointing at /help
        that the others never see."""
        self.a.dataReceived(b"/help\n/frobnicate now\n/\n")
        lines = self.ta.take().split(b"\n")
        self.assertEqual(lines[0], b"/help")
        self.assertTrue(lines[1].startswith(b"* commands: /nick NAME"))
        self.assertEqual(lines[2:4], [b"/frobnicate now", b"* error: unknown command /frobnicate "
                                      b"(/help lists the commands)"])
        self.assertEqual(lines[4:6], [b"/", b"* error: unknown command / (/help lists the commands)"])
        self.assertEqual(self.tb.take(), b"")

    def test_doubleSlashSendsASlashLine(self) -> None:
        """A line starting with // is sent to the others as a chat line beginning with one slash."""
        self.a.dataReceived(b"//usr/bin\r\n")
        self.assertEqual(self.ta.take(), b"//usr/bin\r\n")
        self.assertEqual(self.tb.take(), b"<127.0.0.1:40001> /usr/bin\n")

    def test_parseCommand(self) -> None:
        """Only a single leading slash makes a command, its name is case-insensitive and its argument is trimmed."""
        self.assertIsNone(parseCommand(b"hello"))
        self.assertIsNone(parseCommand(b"//x"))
        command = parseCommand(b"/NICK   bob \t")
        assert command is not None
        self.assertEqual((command.name, command.argument), ("nick", b"bob"))


class LimitTests(unittest.TestCase):
    def test_maxClients(self) -> None:
        """A client over --max-clients is told the server is full and closed without the others noticing, and a freed
        slot admits the next one."""
        room = Room(maxClients=2)
        a, ta = room.connect()
        _, tb = room.connect()
        c, tc = room.connect(quiet=False)
        self.assertEqual(tc.value(), b"* server full (2 clients), try again later\n")
        self.assertTrue(tc.disconnecting)
        self.assertEqual((ta.value(), tb.value()), (b"", b""))
        self.assertEqual(room.hub.stats.refused, 1)
        room.disconnect(c)
        room.disconnect(a)
        _, td = room.connect(quiet=False)
        self.assertTrue(td.value().startswith(b"* welcome"))
        self.assertEqual(room.hub.connections, 2)

    def test_lineTooLong(self) -> None:
        """A line over --max-line gets a one-line error naming the limit and disconnects its sender after the lines
        before it are delivered, and the others are told why it left."""
        room = Room(maxLine=10)
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"0123456789\r\nfine\n01234567890\nnever\n")
        self.assertEqual(ta.take(), b"0123456789\r\nfine\n* line too long: the limit is 10 bytes (--max-line); "
                                    b"disconnecting\n")
        self.assertTrue(ta.disconnecting)
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> 0123456789\n<127.0.0.1:40001> fine\n"
                                    b"* 127.0.0.1:40001 left (line too long)\n")
        self.assertEqual(room.hub.stats.tooLong, 1)

    def test_endlessLineIsNotBuffered(self) -> None:
        """A line that never ends is cut off once it passes --max-line; the server never holds
        more than that much of it."""
        room = Room(maxLine=64 * 1024)
        a, ta = room.connect()
        _, tb = room.connect()
        a.dataReceived(b"ok\nxx")
        chunk = b"x" * 4096
        fed = 0
        while fed < 1 << 20 and not ta.disconnecting:
            a.dataReceived(chunk)
            fed += len(chunk)
            self.assertLessEqual(len(a._partial), 64 * 1024 + 1)
        self.assertTrue(ta.disconnecting)
        self.assertLessEqual(fed, 64 * 1024 + 4096)
        self.assertEqual(len(a._partial), 0)
        self.assertEqual(ta.take(), b"ok\n* line too long: the limit is 65536 bytes (--max-line); disconnecting\n")
        self.assertEqual(tb.take(), b"<127.0.0.1:40001> ok\n* 127.0.0.1:40001 left (line too long)\n")
        a.dataReceived(chunk + b"\n")
        self.assertEqual((ta.value(), tb.value()), (b"", b""))

    def test_lineEndingCountsNot(self) -> None:
        """A line of exactly --max-line bytes is fine with either line end, even split before the \\n."""
        room = Room(maxLine=4)
        a, ta = room.connect()
        a.dataReceived(b"abcd\r")
        a.dataReceived(b"\nabcd\n")
        self.assertEqual(ta.take(), b"abcd\r\nabcd\n")
        self.assertFalse(ta.disconnecting)

    def test_idleTimeout(self) -> None:
        """A client silent for --idle-timeout seconds is told and disconnected, while any line it sends restarts its
        clock."""
        room = Room(idleTimeout=10)
        a, ta = room.connect()
        b, tb = room.connect()
        room.clock.advance(9)
        a.dataReceived(b"still here\n")
        b.dataReceived(b"me too\n")
        room.clock.advance(9)
        b.dataReceived(b"and still\n")
        self.assertFalse(ta.disconnecting)
        ta.take()
        tb.take()
        room.clock.advance(1.5)
        self.assertEqual(ta.take(), b"* idle for 10s (--idle-timeout): disconnecting\n")
        self.assertTrue(ta.disconnecting)
        self.assertIn(b"* 127.0.0.1:40001 left (idle)\n", tb.take())
        self.assertEqual(room.hub.stats.idle, 1)

    def test_idleTimeoutOff(self) -> None:
        """Without --idle-timeout a silent client is never disconnected and no timer is kept for it."""
        room = Room()
        _, ta = room.connect()
        room.clock.advance(1e6)
        self.assertFalse(ta.disconnecting)
        self.assertEqual(room.clock.getDelayedCalls(), [])

    def test_notIdleWhileWeAreNotReading(self) -> None:
        """A client we stopped reading from (its socket is full) is not timed out for it."""
        room = Room(idleTimeout=10)
        a, ta = room.connect()
        assert a.queue is not None
        a.queue.pauseProducing()
        room.clock.advance(100)
        self.assertFalse(ta.disconnecting)
        ta.drain()
        room.clock.advance(9)
        self.assertFalse(ta.disconnecting)
        room.clock.advance(2)
        self.assertTrue(ta.disconnecting)


class SlowReaderTests(unittest.TestCase):
    """--send-queue: a listener too far behind is dropped; a sender is just not read from."""

    LIMIT = 10_000

    def test_slowListenerIsDroppedOthersGetEverything(self) -> None:
        """A listener that stops reading is dropped, told why, once its queue would pass --send-queue, while everyone
        else gets every line and a client that never goes is aborted after the grace period."""
        room = Room(sendQueue=self.LIMIT)
        a, ta = room.connect()
        slow, tslow = room.connect()
        _, tc = room.connect()
        assert slow.queue is not None
        slow.queue.pauseProducing()
        self.assertEqual(tslow.producerState, "paused", "not read from either")
        line = b"x" * 999 + b"\n"
        sent = 0
        while not tslow.disconnecting and sent < 100:
            a.dataReceived(line)
            sent += 1
            if not tslow.disconnecting:
                self.assertLessEqual(slow.queue.queued, self.LIMIT)
        self.assertTrue(tslow.disconnecting)
        self.assertEqual(sent, 10, "dropped by the line that would take it past 10000 bytes (1018 each)")
        self.assertEqual(slow.queue.queued, 0, "what was queued for it is released")
        self.assertEqual(
            tslow.take(), b"* too slow: over 10000 bytes waiting for you (--send-queue); disconnecting\n"
        )
        self.assertNotIn(slow, room.hub.members)
        self.assertEqual(room.hub.stats.slow, 1)
        for _ in range(5):
            a.dataReceived(line)
        self.assertEqual(tslow.value(), b"")
        got = tc.take()
        self.assertEqual(got.count(b"<127.0.0.1:40001> " + line), sent + 5)
        self.assertIn(b"* 127.0.0.1:40002 left (too slow)\n", got)
        self.assertEqual(ta.take().replace(b"* 127.0.0.1:40002 left (too slow)\n", b""), line * (sent + 5))
        self.assertFalse(tslow.disconnected)
        room.clock.advance(room.hub.config.closeGrace)
        self.assertTrue(tslow.disconnected, "aborted if it does not go within the grace period")

    def test_slowListenerThatCatchesUpStays(self) -> None:
        """A listener that falls behind but catches up in time is kept and gets every line in order."""
        room = Room(sendQueue=self.LIMIT, bufferSize=3000)
        a, _ = room.connect()
        b, tb = room.connect()
        line = b"y" * 499 + b"\n"
        for _ in range(100):
            a.dataReceived(line)
            if b.queue is not None and b.queue.paused and b.queue.queued > self.LIMIT // 2:
                tb.drain()
        tb.drain()
        self.assertFalse(tb.disconnecting)
        self.assertEqual(tb.value(), (b"<127.0.0.1:40001> " + line) * 100)

    def test_queueIsExactAndFitsToTheByte(self) -> None:
        """A listener whose queue reaches --send-queue exactly is kept, and one byte more drops it."""
        room = Room(sendQueue=self.LIMIT)
        a, _ = room.connect()
        b, tb = room.connect()
        assert b.queue is not None
        b.queue.pauseProducing()
        prefixed = len(b"<127.0.0.1:40001> ") + 1
        a.dataReceived(b"z" * (self.LIMIT - prefixed) + b"\n")
        self.assertEqual(b.queue.queued, self.LIMIT)
        self.assertFalse(tb.disconnecting)
        a.dataReceived(b"\n")
        self.assertTrue(tb.disconnecting)

    def test_senderNotReadingItsEchoesIsPausedNotDropped(self) -> None:
        """A sender that does not read its own echoes is paused rather than dropped, loses nothing, and is read from
        again once it catches up."""
        room = Room(sendQueue=self.LIMIT)
        a, ta = room.connect(bufferSize=4096)
        _, tb = room.connect()
        first = b"".join(b"%05d " % i + b"e" * 90 + b"\n" for i in range(100))
        a.dataReceived(first)
        assert a.queue is not None
        self.assertTrue(a.queue.paused)
        self.assertEqual(ta.producerState, "paused", "reading from the sender stops")
        late = b"".join(b"%05d " % i + b"f" * 90 + b"\n" for i in range(100, 300))
        a.dataReceived(late)
        self.assertGreater(a.queue.queued, self.LIMIT, "bytes read before the pause took effect are not lost")
        self.assertFalse(ta.disconnecting, "its own echoes never count as too slow")
        self.assertEqual(tb.value().count(b"\n"), 300)
        ta.drain()
        self.assertEqual(ta.producerState, "paused", "still behind: still not read from")
        for _ in range(10):
            ta.drain()
        self.assertEqual(ta.producerState, "producing")
        self.assertEqual(a.queue.queued, 0)
        self.assertEqual(ta.take(), first + late)

    def test_senderThatIsAlsoASlowListener(self) -> None:
        """A client that neither reads nor stops sending: its own lines pause it, others' lines
        (past the limit) drop it; the rest hear all of it up to then."""
        room = Room(sendQueue=self.LIMIT, bufferSize=2000)
        a, ta = room.connect()
        b, tb = room.connect()
        a.dataReceived(b"a" * 1500 + b"\n" + b"b" * 1500 + b"\n")
        self.assertEqual(ta.producerState, "paused")
        for _ in range(20):
            b.dataReceived(b"c" * 999 + b"\n")
            tb.drain()
        self.assertTrue(ta.disconnecting)
        self.assertFalse(tb.disconnecting)
        self.assertEqual(tb.value().count(b"<127.0.0.1:40001> "), 2)

    def test_manyDroppedInOneBroadcast(self) -> None:
        """Clients dropped in the middle of a broadcast do not stop it reaching the others."""
        room = Room(sendQueue=100)
        a, _ = room.connect()
        clients = [room.connect() for _ in range(6)]
        for client, _ in clients[::2]:
            assert client.queue is not None
            client.queue.pauseProducing()
        a.dataReceived(b"q" * 200 + b"\n")
        for i, (_, transport) in enumerate(clients):
            got = transport.take()
            if i % 2:
                self.assertTrue(got.startswith(b"<127.0.0.1:40001> " + b"q" * 200 + b"\n"))
                self.assertEqual(got.count(b"left (too slow)"), 3)
                self.assertFalse(transport.disconnecting)
            else:
                self.assertTrue(transport.disconnecting)
        self.assertEqual(len(room.hub.members), 4)


class SendQueueTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["put", "offer", "drain"]), st.integers(1, 3000)), max_size=60))
    def test_exactAccounting(self, ops: list[tuple[str, int]]) -> None:
        """Whatever happens, ``queued`` is the bytes held, the limit holds for ``offer``, and
        every accepted byte reaches the transport in order once it drains."""
        transport = FlowTransport(None, bufferSize=2500)
        queue = SendQueue(transport, 5000)
        transport.registerProducer(queue, True)
        accepted = []
        for n, (op, size) in enumerate(ops):
            data = bytes([n % 256]) * size
            if op == "put":
                queue.put(data)
                accepted.append(data)
            elif op == "offer":
                before = queue.queued
                if queue.offer(data):
                    accepted.append(data)
                else:
                    self.assertGreater(queue.offered + size, 5000)
                    self.assertEqual(queue.queued, before)
            else:
                transport.drain()
            self.assertEqual(queue.queued, sum(len(c) for c, _ in queue._queue or ()))
            self.assertEqual(queue.offered, sum(len(c) for c, offered in queue._queue or () if offered))
            self.assertLessEqual(queue.offered, 5000)
        for _ in range(len(ops) + 1):
            transport.drain()
        self.assertEqual(queue.queued, 0)
        self.assertEqual(transport.value(), b"".join(accepted))
        self.assertEqual(queue.written, len(transport.value()))


class EscapingTests(unittest.TestCase):
    def test_controlsEscapedTextKept(self) -> None:
        """Controls, bad UTF-8, C1, bidi and separator characters and backslashes are escaped while ordinary text and
        emoji pass unchanged, and every escape reverses."""
        cases = {
            b"plain ascii, tab\there": b"plain ascii, tab\there",
            b"cr\rlf": b"cr\\x0dlf",
            b"\x1b[2J\x1b]0;title\x07": b"\\x1b[2J\\x1b]0;title\\x07",
            b"nul\x00del\x7f": b"nul\\x00del\\x7f",
            b"bad \xff\xfe utf8 \xc3": b"bad \\xff\\xfe utf8 \\xc3",
            b"surrogate \xed\xa0\x80": b"surrogate \\xed\\xa0\\x80",
            "gr\u00fc\u00dfe \u65e5\u672c \U0001f600".encode(): "gr\u00fc\u00dfe \u65e5\u672c \U0001f600".encode(),
            "c1 \x9b31m".encode(): b"c1 \\u009b31m",
            "bidi \u202eevil".encode(): b"bidi \\u202eevil",
            "sep\u2028x".encode(): b"sep\\u2028x",
            b"back\\slash": b"back\\\\slash",
        }
        for raw, escaped in cases.items():
            self.assertEqual(escapeLine(raw), escaped, raw)
            self.assertEqual(unescapeLine(escaped), raw)

    def test_plainAsciiIsTheSameObject(self) -> None:
        """A line with nothing to escape is passed on without being copied."""
        line = b"nothing to escape here"
        self.assertIs(escapeLine(line), line)

    @settings(max_examples=500, deadline=None)
    @given(st.one_of(st.binary(max_size=200), st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    def test_escapedIsSafeAndReversible(self, raw: bytes) -> None:
        """Any line of bytes escapes to UTF-8 text with no control, separator or bidi character, and unescapes back
        to the same bytes."""
        escaped = escapeLine(raw)
        self.assertEqual(unescapeLine(escaped), raw)
        text = escaped.decode("utf-8")
        self.assertIsNone(re.search("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]", text))

    def test_escapeText(self) -> None:
        """A name or path is escaped as a chat line is."""
        self.assertEqual(escapeText("unix:/tmp/\x1b.sock"), "unix:/tmp/\\x1b.sock")

    def test_everyBidiAndInvisibleCharacterIsEscapedForOthers(self) -> None:
        """Each bidi mark, embedding, override and isolate, each invisible character and U+2028/U+2029
        reaches the other clients spelled out, and comes back to its sender exactly."""
        room = Room()
        a, ta = room.connect()
        _, tb = room.connect()
        for ch, (why, spelled) in NAMED.items():
            if ch == "\n":
                continue  # the line end itself
            raw = ("left " + ch + " right").encode("utf-8")
            a.dataReceived(raw + b"\n")
            self.assertEqual(ta.take(), raw + b"\n", why)
            self.assertEqual(tb.take(), b"<127.0.0.1:40001> left " + spelled + b" right\n", why)

    def test_chatAndFileNamesEscapeTheSameCharacters(self) -> None:
        """What chat escapes for others' terminals, file names in logs and client output escape too."""
        for ch, (why, _) in NAMED.items():
            self.assertNotIn(ch, escapeText("a" + ch), why)
            self.assertNotIn(ch, escapeName("a" + ch), why)
            self.assertNotIn(ch, safeText("a" + ch), why)
        for ch in ["\u00e9", "\u05d0", "\u65e5", "\U0001f600"]:
            self.assertEqual((escapeText(ch), escapeName(ch)), (ch, ch))

    def test_unixPeerNameIsEscaped(self) -> None:
        """A client's self-chosen unix socket path cannot put bidi marks into others' notices."""
        self.assertEqual(describeAddress(UNIXAddress("/tmp/\u200fx\u2066.sock")), "unix:/tmp/\\u200fx\\u2066.sock")


class ShutdownTests(unittest.TestCase):
    def test_clientsAreToldThenClosed(self) -> None:
        """On shutdown every client gets what was queued for it and then a notice before it is closed, latecomers are
        turned away, nobody hears leave notices, and the stop completes once all are gone."""
        room = Room(bufferSize=100)
        a, ta = room.connect()
        b, tb = room.connect()
        b.dataReceived(b"q" * 300 + b"\n")
        ta.take()
        a.dataReceived(b"queued for b\n")
        assert b.queue is not None and b.queue.queued
        d = room.hub.shutdown()
        self.assertTrue(ta.take().endswith(b"* server shutting down\n"))
        self.assertTrue(tb.value().endswith(b"<127.0.0.1:40001> queued for b\n* server shutting down\n"),
                        "what was queued goes out first")
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        self.assertNoResult(d)
        late, tlate = room.connect(quiet=False)
        self.assertEqual(tlate.value(), b"* server shutting down\n")
        room.disconnect(a)
        room.disconnect(b)
        self.assertNoResult(d)
        room.disconnect(late)
        self.successResultOf(d)
        self.assertEqual(tb.value().count(b"left"), 0, "nobody is told about leaves while stopping")

    def test_stuckClientsDoNotHoldTheStop(self) -> None:
        """A client that does not go on shutdown is aborted after the grace period so the stop still completes."""
        room = Room()
        _, ta = room.connect()
        d = room.hub.shutdown()
        room.clock.advance(room.hub.config.closeGrace)
        self.assertTrue(ta.disconnected, "aborted")
        room.clock.advance(1)
        self.successResultOf(d)

    def test_nobodyConnected(self) -> None:
        """Shutting down an empty hub completes at once."""
        self.successResultOf(Room().hub.shutdown())


class LogAndStatsTests(unittest.TestCase):
    def test_statsCountWhatHappened(self) -> None:
        """The stats count connected, joined and refused clients, lines and bytes in, and the bytes sent out."""
        room = Room(maxClients=2)
        a, _ = room.connect()
        room.connect()
        room.connect()
        a.dataReceived(b"one\ntwo\n/who\n")
        fields = room.hub.statsFields()
        self.assertEqual((fields["clients"], fields["joined"], fields["refused"]), (2, 2, 1))
        self.assertEqual((fields["lines"], fields["bytesIn"]), (3, 13))
        self.assertGreater(fields["bytesOut"], 13 + 2 * len(b"<127.0.0.1:40001> one\n"))

    def test_clientEventsInAStormAreCountedNotAllLogged(self) -> None:
        """A storm of connections does not become a storm of log lines; the stats line counts the rest."""
        room = Room(noticeLimit=0)
        with capturedLogs() as events:
            for _ in range(300):
                room.connect()
            joins = [e for e in events if "joined" in e.get("log_format", "")]
            self.assertEqual(len(joins), 200)
            self.assertEqual(room.hub.stats.unlogged, 100)
            room.clock.advance(60)
            room.connect()
            self.assertEqual(len([e for e in events if "joined" in e.get("log_format", "")]), 201)
            room.hub.logStats()
        self.assertEqual(events[-1]["unlogged"], 100)
        self.assertEqual(events[-1]["joined"], 301)


class OptionsAndServiceTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """With no options tcplab-multi listens on TCP port 7001 with a 1 MiB send queue, 64 KiB lines, no client or
        idle limit and a stats line every minute."""
        options = multitap.Options()
        options.parseOptions([])
        self.assertEqual(options["port"], 7001)
        config = options.hubConfig()
        self.assertEqual(
            (config.sendQueue, config.maxClients, config.maxLine, config.idleTimeout, config.noticeLimit),
            (1 << 20, 0, 65536, 0, 100),
        )
        self.assertEqual(options["stats-interval"], 60)
        self.assertEqual(options.endpointDescriptions()[0].split(":backlog=")[0], "tcp:7001")

    def test_badValuesAreOneLineErrors(self) -> None:
        """Bad option values, and --listen combined with --port, are rejected with one-line usage errors."""
        for argv in (["--send-queue", "lots"], ["--max-clients", "-1"], ["--max-line", "0"],
                     ["--idle-timeout", "x"], ["--stats-interval", "-5"], ["--listen", "tcp:1", "--port", "2"]):
            error = self.assertRaises(usage.UsageError, multitap.Options().parseOptions, argv)
            self.assertNotIn("\n", str(error))

    def test_statsLineEveryInterval(self) -> None:
        """A stats line is logged every --stats-interval seconds, one more at stop, and none after it, with the open
        files limit logged at start."""
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--interface", "127.0.0.1", "--stats-interval", "30"])
        reactor = MemoryReactorClock()
        service = multitap.HubService(options, reactor)
        with capturedLogs() as events:
            service.startService()
            reactor.advance(29)
            stats = [e for e in events if "stats:" in e.get("log_format", "")]
            self.assertEqual(stats, [])
            reactor.advance(1)
            stats = [e for e in events if "stats:" in e.get("log_format", "")]
            self.assertEqual(len(stats), 1)
            self.assertEqual(stats[0]["clients"], 0)
            self.assertTrue(any("open files limit" in e.get("log_format", "") for e in events))
            self.successResultOf(service.stopService())
        reactor.advance(300)
        self.assertEqual(len([e for e in events if "stats:" in e.get("log_format", "")]), 2, "one more at stop")

    def test_statsOff(self) -> None:
        """--stats-interval 0 logs no stats lines and keeps no timer."""
        options = multitap.Options()
        options.parseOptions(["--port", "0", "--stats-interval", "0"])
        reactor = MemoryReactorClock()
        service = multitap.HubService(options, reactor)
        service.startService()
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.successResultOf(service.stopService())

    def test_makeService(self) -> None:
        """The twistd plugin's service is named tcplab-multi and listens where --listen says."""
        options = multitap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
        service = multitap.makeService(options)
        self.assertEqual(service.name, "tcplab-multi")
        self.assertEqual(service.listening.descriptions[0].split(":backlog=")[0], "tcp:0:interface=127.0.0.1")
