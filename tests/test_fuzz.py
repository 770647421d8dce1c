"""Fuzzing the two parsers that strangers talk to: arbitrary byte streams, split at arbitrary
points, into tcplab-file's protocol and into several clients of the tcplab-multi hub.

Whatever arrives: no unhandled exception (raised or logged), every reply a valid line (or a clean
error, and then the connection closes and hears nothing more), and no buffer past its limit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from itertools import pairwise

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcplab.escaping import unescapeLine
from tcplab.file.receiver import FileReceiverFactory, State
from tcplab.file.store import FileStore, synchronous
from tcplab.file.wire import MAX_HEADER, MAX_TRAILER, Clash, Err, Ok, formatPut, formatStat, formatTrailer, parseReply
from tcplab.multi.hub import HubClient, HubConfig, MultiHub
from tcplab.multi.wire import NICK
from tcplab.testing import FakeTransport

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEX = "ab" * 32


def note(what: str) -> None:
    """Count what the fuzzer reached (``pytest --hypothesis-show-statistics`` lists it)."""
    if currently_in_test_context():
        event(what)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _validPut(name: str, data: bytes, trailer: bool, token: str | None, clash: Clash | None) -> bytes:
    if trailer:
        return formatPut(len(data), name, trailer=True, token=token, clash=clash) + data + formatTrailer(_sha(data))
    return formatPut(len(data), name, sha256=_sha(data), token=token, clash=clash) + data


def _oddPut(name: str, data: bytes, offset: int, wrongHash: bool) -> bytes:
    """A resumed or wrongly hashed upload (bad-offset, checksum-mismatch, or a resume that works)."""
    offset = min(offset, len(data))
    digest = HEX if wrongHash else _sha(data)
    return formatPut(len(data), name, trailer=True, offset=offset) + data[offset:] + formatTrailer(digest)


#: Pieces of the file protocol, so the fuzzer reaches past the first word.
FILE_TOKENS = [
    b"PUT ", b"STAT ", b"sha256=trailer ", f"sha256={HEX} ".encode(), b"offset=0 ", b"offset=3 ", b"offset=-1 ",
    b"clash=fail ", b"clash=rename ", b"clash=x ", b"token=secret ", b"token= ", b"0 ", b"3 ", b"5 ", b"12 ",
    b"007 ", b"99999999999999999999 ", b"9223372036854775808 ", b"a.txt", b"dir/b.txt", b"../x", b"/etc/passwd",
    b".tcplab-x.tmp", b"a\\b", b"\xe2\x80\xae.txt", b"\xff\xfe", b"\x00", b"\x1b[2J", b" ", b"  ", b"\n", b"\r\n",
    b"\r", f"SHA256 {HEX}\n".encode(), b"SHA256 ", b"hello", b"GET / HTTP/1.1\r\n", b"x" * 5000,
]

#: Request lines that follow the grammar more or less, then some body or trailer.
fileRequests = st.builds(
    lambda word, options, size, name, end, body: b" ".join([word, *options, size, name]) + end + body,
    st.sampled_from([b"PUT", b"PUT", b"STAT", b"put", b"PUTS"]),
    st.lists(st.sampled_from([b"sha256=trailer", f"sha256={HEX}".encode(), b"sha256=zz", b"offset=0", b"offset=2",
                              b"offset=999", b"clash=fail", b"clash=rename", b"token=secret", b"token=wrong",
                              b"x=y"]), max_size=3),
    st.sampled_from([b"0", b"2", b"5", b"64", b"2000000", b"99999999999999999999", b"-1", b"0x10", b""]),
    st.sampled_from([b"a.txt", b"../x", b"d/e", b"\xe2\x80\xae.txt", b"a//b", b".", b"x" * 300, b".tcplab-y",
                     b"a\\b", b"d/e/f", b"\xff", b"", b"with space.txt"]),
    st.sampled_from([b"\n", b"\r\n"]),
    st.one_of(st.binary(max_size=80), st.sampled_from([f"SHA256 {HEX}\n".encode(), b"SHA256 nope\n"])),
)

fileChunks = st.lists(
    st.one_of(
        fileRequests,
        st.sampled_from(FILE_TOKENS),
        st.binary(max_size=64),
        st.builds(_validPut, st.sampled_from(["a.txt", "d/e.bin", "z"]), st.binary(max_size=300), st.booleans(),
                  st.sampled_from([None, None, "secret", "wrong"]), st.sampled_from([None, Clash.FAIL, Clash.RENAME])),
        st.builds(_oddPut, st.sampled_from(["a.txt", "z"]), st.binary(max_size=50), st.integers(0, 8), st.booleans()),
        st.builds(formatStat, st.integers(0, 400), st.sampled_from(["a.txt", "z"]),
                  st.sampled_from([None, "secret"])),
    ),
    max_size=12,
).map(b"".join)

#: Cut points as fractions of the stream, so any split is reachable whatever its length; True
#: lets the clock pass the header timeout at that point.
cuts = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 15).map(lambda n: n == 0)), max_size=12)
Cuts = list[tuple[float, bool]]

_REPLY = re.compile(r"(OK (0|[1-9][0-9]*) [0-9a-f]{64} .+|HAVE (0|[1-9][0-9]*) [0-9a-f]{64}|ERR [a-z][a-z-]* .+)")


def split(stream: bytes, fractions: Cuts) -> list[tuple[bytes, bool]]:
    """``stream`` cut at each fraction of its length, each piece with whether time passes after it."""
    ticks: dict[int, bool] = {len(stream): False}
    for fraction, tick in fractions:
        point = int(fraction * len(stream))
        ticks[point] = ticks.get(point, False) or tick
    points = sorted(ticks)
    return [(stream[a:b], ticks[b]) for a, b in pairwise([0, *points]) if b > a]


class FileProtocolFuzzTests(SynchronousTestCase):
    def run_(self, stream: bytes, fractions: Cuts, token: bool, ending: str) -> None:
        top = tempfile.mkdtemp(prefix="tcplab-fuzz-")
        try:
            self.check(top, stream, fractions, token, ending)
        finally:
            shutil.rmtree(top, True)
        self.assertEqual(self.flushLoggedErrors(), [])

    def check(self, top: str, stream: bytes, fractions: Cuts, token: bool, ending: str) -> None:
        folder = os.path.join(top, "drop")  # ``top`` shows anything that got out of it
        os.mkdir(folder)
        store = FileStore(folder, runBlocking=synchronous)
        store.fsync = lambda fd: None  # durability is not what is fuzzed here
        clock = Clock()
        factory = FileReceiverFactory(store, clock=clock, token=b"secret" if token else None, maxSize=1 << 20,
                                      headerTimeout=5, idleTimeout=5)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        errAt: int | None = None
        for piece, tick in split(stream, fractions):
            protocol.dataReceived(piece)
            if tick:
                clock.advance(6)
            limit = MAX_TRAILER if protocol.state is State.TRAILER else MAX_HEADER
            self.assertLess(protocol.buffered, limit)
            if errAt is None and protocol.state is State.CLOSING:
                errAt = len(transport.value())
        if ending != "abort":
            protocol.readConnectionLost()  # the peer half-closes: whatever was cut short is an ERR
        if errAt is None and protocol.state is State.CLOSING:
            errAt = len(transport.value())
        if errAt is not None:
            clock.advance(factory.linger)
            self.assertTrue(transport.disconnected, "an ERR is followed by a close (at the latest after the linger)")
            self.assertEqual(len(transport.value()), errAt, "nothing is sent after an ERR")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [], "no timer outlives the connection")

        output = transport.value()
        self.assertTrue(output == b"" or output.endswith(b"\n"), output[-100:])
        replies = []
        for line in output.split(b"\n")[:-1]:
            text = line.decode("utf-8")
            self.assertTrue(_REPLY.fullmatch(text) and text.isprintable(), line)
            replies.append(parseReply(line))
        for reply in replies:
            note(f"file: {type(reply).__name__} {reply.code if isinstance(reply, Err) else ''}")
        self.assertFalse(any(isinstance(r, Err) for r in replies[:-1]), "an ERR is always the last reply")
        self.assertEqual((errAt is not None), bool(replies) and isinstance(replies[-1], Err))

        self.assertEqual(os.listdir(top), ["drop"], "nothing outside the folder")
        for reply in replies:
            if isinstance(reply, Ok):
                with open(os.path.join(folder, reply.name), "rb") as f:
                    data = f.read()
                self.assertEqual((len(data), _sha(data)), (reply.size, reply.sha256))
        leftovers = [n for n in os.listdir(folder) if n.startswith(".tcplab-") and not n.endswith(".partial")]
        self.assertEqual(leftovers, [], "temporary files never outlive their connection")
        self.assertEqual((store.reserved, factory.connections), (0, 0))
        store.close()

    @FUZZ
    @given(fileChunks, cuts, st.integers(0, 3).map(lambda n: n == 0), st.sampled_from(["half-close", "abort"]))
    def test_arbitraryStreams(self, stream: bytes, fractions: Cuts, token: bool, ending: str) -> None:
        """Any stream of file requests, cut anywhere, with or without a token, ending in a half-close or an abort,
        keeps buffers bounded, sends nothing after an ERR and leaves no timer or stray file."""
        self.run_(stream, fractions, token, ending)

    @FUZZ
    @given(st.binary(max_size=6000), cuts)
    def test_rawBytes(self, stream: bytes, fractions: Cuts) -> None:
        """Arbitrary bytes sent to the file server in any pieces keep buffers bounded, end any ERR with a close and
        store only files that match their OK."""
        self.run_(stream, fractions, False, "half-close")

    def test_examplesThatMustWork(self) -> None:
        """The fuzzer's strategies do reach the interesting states (a sanity check on the fuzzer)."""
        self.run_(_validPut("a.txt", b"hello", True, None, None) + _validPut("d/e.bin", b"x", False, None, None),
                  [(0.3, False), (0.5, False)], False, "abort")
        self.run_(b"PUT 3 a\nab", [(0.5, True)], False, "half-close")


# -- the hub -------------------------------------------------------------------------------

MULTI_TOKENS = [
    b"/nick ", b"/nick alice", b"/nick Bob_2", b"/nick a:b", b"/nick " + b"x" * 40, b"/who", b"/help", b"/quit",
    b"/QUIT now", b"/bogus", b"//", b"/", b"hello", b"\n", b"\r\n", b"\r", b"\t", b"\\", b"\x00", b"\x1b[2J",
    b"\x7f", b"\xc2\x85", b"\xe2\x80\xae", b"\xe2\x80\xa8", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"* fake",
    b"<bob> fake", b"x" * 60, b"/nick alice\n", b"/nick bob\n", b"/who\n", b"/quit\n", b"//x\n",
    b"a line that fills queues of non-readers\n" * 4,
    # the rest of the unsafe set (tcplab.escaping): bidi marks, embeddings, overrides, isolates, separators,
    # invisible and format characters; and a line of exactly MAX_LINE bytes, and one byte more
    *(ch.encode("utf-8") for ch in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069\u2029"
                                   "\u00ad\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\U000e0001\u00a0"),
    b"y" * 48, b"y" * 49,
]

multiChunk = st.lists(st.one_of(st.sampled_from(MULTI_TOKENS), st.binary(max_size=24)), min_size=1, max_size=8)

#: (what, which client, bytes): send bytes, read (drain) the client's buffer, let time pass,
#: drop the connection, or connect a new client.
multiAction = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 5), multiChunk.map(b"".join)),
    st.tuples(st.just("send"), st.integers(0, 5), multiChunk.map(b"".join)),
    st.tuples(st.just("drain"), st.integers(0, 5), st.just(b"")),
    st.tuples(st.just("tick"), st.integers(0, 5), st.just(b"")),
    st.tuples(st.just("drop"), st.integers(0, 5), st.just(b"")),
    st.tuples(st.just("join"), st.integers(0, 5), st.just(b"")),
)

MAX_LINE = 48
SEND_QUEUE = 300
BUFFER = 100
#: What a terminal must never be handed raw in a line from someone else: the unsafe set of
#: tcplab.escaping, spelled out here (but for the backslash, which starts the escapes themselves).
_UNSAFE_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u00a0\u00ad\u061c\u200b-\u200f\u2028-\u202e"
                          "\u2060-\u2064\u2066-\u2069\ufeff\U000e0001\udc80-\udcff]")
_OTHER = re.compile(rb"<([^>\n]+)> (.*)")


class Peer:
    """A fuzzed client: its protocol, transport, and every complete line it sent."""

    def __init__(self, hub: MultiHub, port: int) -> None:
        address = IPv4Address("TCP", "127.0.0.1", port)
        self.client: HubClient = hub.buildProtocol(address)
        self.transport = FakeTransport(address, BUFFER)
        self.closedAt: int | None = None  # how much was written when the hub began closing
        self.client.makeConnection(self.transport)
        self.pending = b""
        self.sent: set[bytes] = set()
        self.gone = False

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()[-(MAX_LINE + 2):]
        self.sent.update(lines)


class MultiProtocolFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.lists(multiAction, max_size=40))
    def test_arbitraryClients(self, actions: list[tuple[str, int, bytes]]) -> None:
        """Any mix of clients joining, sending, draining, idling and dropping keeps every limit, sends only whole
        lines made of what was sent, and leaves no client or timer behind."""
        clock = Clock()
        config = HubConfig(sendQueue=SEND_QUEUE, maxClients=5, maxLine=MAX_LINE, idleTimeout=30, noticeLimit=3,
                           closeGrace=2)
        hub = MultiHub(config, clock)
        peers = [Peer(hub, 40000 + i) for i in range(3)]
        for what, which, data in actions:
            live = [p for p in peers if not p.gone]
            if what == "join":
                peers.append(Peer(hub, 40000 + len(peers)))
                continue
            if not live:
                continue
            peer = live[which % len(live)]
            if what == "send":
                peer.send(data)
            elif what == "drain":
                peer.transport.drain()
            elif what == "tick":
                clock.advance(11)
            elif what == "drop":
                peer.gone = True
                peer.sent.add(peer.pending)  # a clean close ends the input: its last line is delivered
                peer.client.connectionLost(Failure(ConnectionDone()))
            self.checkBounds(hub, peers)
        for peer in peers:
            if not peer.gone:
                peer.sent.add(peer.pending)
                peer.client.connectionLost(Failure(ConnectionDone()))
        clock.advance(config.closeGrace + 1)
        self.assertEqual((hub.connections, len(hub.members), len(hub.names)), (0, 0, 0))
        self.assertEqual(clock.getDelayedCalls(), [], "no timer outlives the clients")
        self.checkOutput(peers)
        self.assertEqual(self.flushLoggedErrors(), [])

    def checkBounds(self, hub: MultiHub, peers: list[Peer]) -> None:
        for peer in peers:
            client = peer.client
            partial = bytes(client._partial)
            # --max-line exactly: an unfinished line holds at most MAX_LINE bytes, or one more if that is a \r
            self.assertTrue(len(partial) <= MAX_LINE or (len(partial) == MAX_LINE + 1 and partial.endswith(b"\r")),
                            len(partial))
            if client.queue is not None:
                self.assertLessEqual(client.queue.offered, SEND_QUEUE)
            if peer.gone:
                continue
            if client.closing and peer.closedAt is None:
                self.assertTrue(peer.transport.disconnecting, "a client the hub is done with is being closed")
                peer.closedAt = len(peer.transport.value())
            elif peer.closedAt is not None:
                self.assertEqual(len(peer.transport.value()), peer.closedAt, "nothing after the close")
        self.assertEqual(set(hub.names.values()), set(hub.members))

    def checkOutput(self, peers: list[Peer]) -> None:
        everything = set().union(*(p.sent for p in peers))
        shown = {(line[:-1] if line.endswith(b"\r") else line) for line in everything}
        shown |= {line[1:] for line in shown if line.startswith(b"//")}
        for peer in peers:
            output = peer.transport.value()
            for reason in re.findall(rb"(?:^|\n)\* (line too long|too slow|idle|bye|you are now|error|server full)",
                                     output):
                note(f"multi: {reason.decode()}")
            self.assertTrue(output == b"" or output.endswith(b"\n"), "only whole lines are sent")
            for line in output.split(b"\n")[:-1]:
                if line in peer.sent:
                    continue  # its own line, echoed exactly
                if line.startswith(b"* "):
                    self.assertIsNone(_UNSAFE_TEXT.search(line.decode("utf-8")), line)
                    continue
                match = _OTHER.fullmatch(line)
                self.assertIsNotNone(match, line)
                assert match is not None
                name, text = match.group(1).decode("utf-8"), match.group(2)
                self.assertTrue(NICK.fullmatch(name) or re.fullmatch(r"127\.0\.0\.1:\d+(#\d+)?", name), name)
                self.assertIsNone(_UNSAFE_TEXT.search(text.decode("utf-8")), line)
                self.assertIn(unescapeLine(text), shown, "what others see is exactly what was sent")
