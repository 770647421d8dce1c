"""The tcplab-file server state machine (tcplab.file.receiver), driven through StringTransport."""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcplab.file.receiver import LINGER_SECONDS, FileReceiver, FileReceiverFactory, State
from tcplab.file.store import FileStore, synchronous
from tcplab.file.wire import (
    EMPTY_SHA256,
    MAX_HEADER,
    MAX_TRAILER,
    Clash,
    Err,
    Have,
    Ok,
    formatPut,
    formatStat,
    formatTrailer,
    parseReply,
)
from tests.support import scratch

LAB = b"the lab's secret\n" * 10
LAB_SHA = hashlib.sha256(LAB).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(name: str, data: bytes, **options: Any) -> bytes:
    """A PUT request with its body (and trailer when ``trailer=True``)."""
    trailer = options.get("trailer", False)
    offset = options.get("offset", 0)
    return formatPut(len(data), name, **options) + data[offset:] + (formatTrailer(sha(data)) if trailer else b"")


class ServerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(scratch(self), "drop")  # its parent shows anything that got out
        os.mkdir(self.dir)
        self.clock = Clock()
        self.store = FileStore(self.dir, runBlocking=synchronous)
        self.addCleanup(self.store.close)
        self.factory = self.makeFactory()

    def makeFactory(self, **kwargs: Any) -> FileReceiverFactory:
        return FileReceiverFactory(self.store, clock=self.clock, **kwargs)

    def connect(self, factory: FileReceiverFactory | None = None) -> tuple[FileReceiver, StringTransport]:
        protocol = (factory or self.factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, data: bytes, chunk: int | None = None) -> tuple[FileReceiver, StringTransport]:
        protocol, transport = self.connect()
        feed(protocol, data, chunk)
        return protocol, transport

    def replies(self, transport: StringTransport) -> list[Any]:
        return [parseReply(line) for line in transport.value().split(b"\n")[:-1]]

    def files(self) -> dict[str, bytes]:
        """Every visible file under the folder (relative path -> content)."""
        found = {}
        for folder, _, names in os.walk(self.dir):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, self.dir)] = f.read()
        return found

    def visible(self) -> dict[str, bytes]:
        return {k: v for k, v in self.files().items() if not os.path.basename(k).startswith(".tcplab-")}

    def hidden(self) -> list[str]:
        return [k for k in self.files() if os.path.basename(k).startswith(".tcplab-")]

    def assertRefused(self, transport: StringTransport, code: str) -> Err:
        replies = self.replies(transport)
        self.assertIsInstance(replies[-1], Err, str(replies))
        self.assertEqual(replies[-1].code, code, replies[-1])
        return replies[-1]  # type: ignore[no-any-return]


def feed(protocol: FileReceiver, data: bytes, chunk: int | None = None) -> None:
    chunk = chunk or len(data) or 1
    for i in range(0, len(data), chunk):
        protocol.dataReceived(data[i:i + chunk])


class FlowTests(ServerTestCase):
    def test_labExample(self) -> None:
        """The lab's example: important_secret_file.txt is stored as received_important_secret_file.txt."""
        protocol, transport = self.send(put("important_secret_file.txt", LAB))
        self.assertEqual(self.replies(transport), [Ok(len(LAB), LAB_SHA, "received_important_secret_file.txt")])
        self.assertEqual(self.visible(), {"received_important_secret_file.txt": LAB})
        self.assertEqual(self.hidden(), [])
        self.assertFalse(transport.disconnecting, "the connection stays open for the next file")
        self.assertEqual(protocol.state, State.HEADER)

    def test_severalFiles(self) -> None:
        """Several files on one connection, with a checksum up front, in a trailer or none, and an empty one, are
        each stored under the prefixed name and confirmed in order."""
        data = (put("a.txt", b"A" * 10) + put("b.txt", b"B" * 20, trailer=True)
                + put("c.txt", b"C" * 5, sha256=sha(b"C" * 5)) + put("empty", b""))
        _, transport = self.send(data)
        self.assertEqual([r.name for r in self.replies(transport)],
                         ["received_a.txt", "received_b.txt", "received_c.txt", "received_empty"])
        self.assertEqual(self.visible()["received_b.txt"], b"B" * 20)
        self.assertEqual(self.visible()["received_empty"], b"")

    def test_oddNames(self) -> None:
        """Names with spaces, brackets, Cyrillic letters and equals signs are stored and confirmed exactly as sent,
        behind the prefix."""
        names = ["report (1) [final].txt", "звіт 2025.txt", "a=b c.txt"]
        _, transport = self.send(b"".join(put(n, n.encode()) for n in names))
        self.assertEqual([r.name for r in self.replies(transport)], ["received_" + n for n in names])
        self.assertEqual(self.visible()["received_звіт 2025.txt"], "звіт 2025.txt".encode())

    def test_relativePath(self) -> None:
        """A relative path puts the file in subfolders, created as needed under the received_ prefix."""
        _, transport = self.send(put("folder/sub/f.txt", b"x") + put("folder/g.txt", b"y"))
        self.assertEqual([r.name for r in self.replies(transport)], ["received_folder/sub/f.txt",
                                                                     "received_folder/g.txt"])
        self.assertEqual(self.visible(), {"received_folder/sub/f.txt": b"x", "received_folder/g.txt": b"y"})

    def test_emptyPrefix(self) -> None:
        """With an empty prefix a file is stored under exactly the name the sender gave."""
        self.factory = self.makeFactory(prefix="")
        _, transport = self.send(put("plain.txt", b"x"))
        self.assertEqual(self.replies(transport)[0].name, "plain.txt")

    def stream(self) -> tuple[bytes, list[Any]]:
        data = (put("a.txt", b"0123456789") + put("b b.txt", b"xyz" * 7, trailer=True)
                + formatStat(4, "nothing") + put("c", b"c", sha256=sha(b"c")) + put("d", b""))
        expected = [Ok(10, sha(b"0123456789"), "received_a.txt"), Ok(21, sha(b"xyz" * 7), "received_b b.txt"),
                    Have(0, EMPTY_SHA256), Ok(1, sha(b"c"), "received_c"), Ok(0, EMPTY_SHA256, "received_d")]
        return data, expected

    def test_fragmentsOfEverySize(self) -> None:
        """However the stream is cut into reads, the replies and the files are the same."""
        self.store.fsync = lambda fd: None
        data, expected = self.stream()
        for size in range(1, len(data) + 1):
            _, transport = self.send(data, size)
            self.assertEqual(self.replies(transport), expected, f"read size {size}")
            self.assertEqual(len(self.visible()), 4)
            for name in self.visible():
                os.unlink(os.path.join(self.dir, name))

    @given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
    @settings(max_examples=50, deadline=None)
    def test_randomFragments(self, cuts: list[int]) -> None:
        """However the stream of several files is cut into reads, the server's replies are the same."""
        self.store.fsync = lambda fd: None
        data, expected = self.stream()
        protocol, transport = self.connect()
        pos = 0
        for cut in cuts:
            protocol.dataReceived(data[pos:pos + cut])
            pos += cut
        protocol.dataReceived(data[pos:])
        self.assertEqual(self.replies(transport), expected)
        for name in self.visible():
            os.unlink(os.path.join(self.dir, name))

    def test_duplicateNameGetsUniqueName(self) -> None:
        """A second file of the same name is stored as "name (1)" and the first is left as it was."""
        _, transport = self.send(put("report.txt", b"1") + put("report.txt", b"2"))
        self.assertEqual([r.name for r in self.replies(transport)], ["received_report.txt",
                                                                     "received_report (1).txt"])
        self.assertEqual(self.visible()["received_report.txt"], b"1")

    def test_duplicateNameClashFail(self) -> None:
        """clash=fail and the name is taken: refused on the header, before any body byte."""
        self.send(put("report.txt", b"1") + put("dir/x", b"1"))
        for name in ("report.txt", "dir/x"):
            _, transport = self.send(formatPut(1, name, clash=Clash.FAIL))
            self.assertRefused(transport, "exists")
        self.assertEqual(self.visible(), {"received_report.txt": b"1", "received_dir/x": b"1"})
        self.assertEqual(self.hidden(), [])
        _, transport = self.send(put("dir/y", b"2", clash=Clash.FAIL))
        self.assertIsInstance(self.replies(transport)[0], Ok)

    def test_clashFailRaceCaughtAtCommit(self) -> None:
        """The name is taken while the body streams in: still refused, the other file kept."""
        protocol, transport = self.send(formatPut(1, "late.txt", clash=Clash.FAIL))
        with open(os.path.join(self.dir, "received_late.txt"), "wb") as f:
            f.write(b"first")
        protocol.dataReceived(b"2")
        self.assertRefused(transport, "exists")
        self.assertEqual(self.visible(), {"received_late.txt": b"first"})
        self.assertEqual(self.hidden(), [])

    def test_overwrite(self) -> None:
        """With overwrite on, a second file of the same name replaces the first."""
        self.store.overwrite = True
        self.send(put("report.txt", b"1"))
        _, transport = self.send(put("report.txt", b"2"))
        self.assertEqual(self.replies(transport)[0].name, "received_report.txt")
        self.assertEqual(self.visible(), {"received_report.txt": b"2"})

    def test_symlinkAtFinalName(self) -> None:
        """A symlink sitting at the final name is never followed: the file goes to a fresh name and the link's target
        is untouched."""
        victim = os.path.join(scratch(self), "victim")
        with open(victim, "wb") as f:
            f.write(b"precious")
        os.symlink(victim, os.path.join(self.dir, "received_x"))
        _, transport = self.send(put("x", b"evil"))
        self.assertEqual(self.replies(transport)[0].name, "received_x (1)")
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"precious")

    def test_token(self) -> None:
        """With a token set, only a PUT carrying exactly that token is stored; a missing or wrong token, and a STAT
        without one, are refused as bad-token."""
        self.factory = self.makeFactory(token=b"s3cret")
        _, transport = self.send(put("a", b"1", token="s3cret"))
        self.assertIsInstance(self.replies(transport)[0], Ok)
        for options in ({}, {"token": "wrong"}, {"token": "s3cret2"}):
            _, transport = self.send(put("b", b"2", **options))
            self.assertRefused(transport, "bad-token")
        _, transport = self.send(formatStat(1, "b"))
        self.assertRefused(transport, "bad-token")
        self.assertEqual(self.visible(), {"received_a": b"1"})

    def test_statAndResume(self) -> None:
        """An upload cut short is kept; STAT says how much; a PUT at that offset completes it."""
        data = os.urandom(5000)
        protocol, transport = self.send(formatPut(len(data), "big", trailer=True) + data[:3000])
        protocol.readConnectionLost()
        self.assertRefused(transport, "short-body")
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.visible(), {})
        self.assertEqual(len(self.hidden()), 1)

        protocol, transport = self.send(formatStat(len(data), "big"))
        self.assertEqual(self.replies(transport), [Have(3000, sha(data[:3000]))])
        feed(protocol, put("big", data, trailer=True, offset=3000))
        self.assertEqual(self.replies(transport)[1], Ok(len(data), sha(data), "received_big"))
        self.assertEqual(self.visible(), {"received_big": data})
        self.assertEqual(self.hidden(), [])

    def test_resumeOnNewConnection(self) -> None:
        """A file cut off mid-body can be finished from the stored offset on a new connection and ends up whole and
        verified."""
        data = os.urandom(3000)
        protocol, _ = self.send(formatPut(len(data), "big", sha256=sha(data)) + data[:1000])
        protocol.connectionLost(Failure(Exception("killed")))
        _, transport = self.send(put("big", data, sha256=sha(data), offset=1000))
        self.assertEqual(self.replies(transport), [Ok(len(data), sha(data), "received_big")])
        self.assertEqual(self.visible(), {"received_big": data})

    def test_resumeWithoutPartial(self) -> None:
        """A resume offset with no partial file to continue is refused as bad-offset and stores nothing."""
        _, transport = self.send(put("big", b"x" * 10, trailer=True, offset=5))
        self.assertRefused(transport, "bad-offset")
        self.assertEqual(self.files(), {})

    def test_readsPausedWhileCommitting(self) -> None:
        """fsync and rename run off the reactor; requests that arrive meanwhile wait their turn."""
        calls: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

        def later(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            calls.append((d, f, args))
            return d

        self.store.runBlocking = later
        protocol, transport = self.send(put("a", b"1") + put("b", b"2"))
        self.assertEqual(protocol.state, State.COMMITTING)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.value(), b"", "no reply before the file is durable")
        self.assertEqual(self.visible(), {})
        d, f, args = calls.pop(0)
        d.callback(f(*args))
        self.assertEqual(len(self.replies(transport)), 1)
        self.assertEqual(protocol.state, State.COMMITTING, "the second request went ahead")
        protocol.readConnectionLost()
        d, f, args = calls.pop(0)
        d.callback(f(*args))
        self.assertEqual([r.name for r in self.replies(transport)], ["received_a", "received_b"])
        self.assertTrue(transport.disconnecting, "closed after the last reply, as the peer had finished")

    def test_pipelinedWithEndOfInputDuringCommit(self) -> None:
        """nc sends everything and half-closes while the first file is still being committed:
        the requests that wait in the buffer are all served before the connection closes."""
        calls: list[tuple[Any, tuple[Any, ...]]] = []
        pending: list[Deferred[Any]] = []

        def tracked(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            calls.append((f, args))
            return d

        self.store.runBlocking = tracked
        protocol, transport = self.connect()
        protocol.dataReceived(put("a", b"1"))
        protocol.dataReceived(put("b", b"22") + put("c", b"", trailer=True))
        protocol.readConnectionLost()
        for _ in range(3):
            self.assertEqual(len(pending), 1, self.replies(transport))
            f, args = calls.pop(0)
            pending.pop(0).callback(f(*args))
        self.assertEqual([r.name for r in self.replies(transport)], ["received_a", "received_b", "received_c"])
        self.assertTrue(transport.disconnecting)

    def test_endOfInputAfterReply(self) -> None:
        """When the sender half-closes after a file, the server closes the connection after its one reply."""
        protocol, transport = self.send(put("a", b"1"))
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.replies(transport)), 1)


class BadInputTests(ServerTestCase):
    """Every bad input: a clear ERR, nothing under a final name, nothing buffered without bound."""

    def assertNothingStored(self) -> None:
        self.assertEqual(self.visible(), {})
        self.assertEqual(self.hidden(), [])

    def test_headerTooLong(self) -> None:
        """A header line over the limit is refused as header-too-long, the connection closes and nothing is stored."""
        protocol, transport = self.send(b"PUT 5 " + b"x" * MAX_HEADER)
        self.assertRefused(transport, "header-too-long")
        self.assertEqual(protocol.state, State.CLOSING)
        self.assertNothingStored()

    def test_headerAtTheLimitIsRead(self) -> None:
        """4096 bytes with the newline is a complete line (refused for its name, not its length)."""
        line = b"PUT 5 " + b"x" * (MAX_HEADER - 7) + b"\n"
        self.assertEqual(len(line), MAX_HEADER)
        _, transport = self.send(line)
        self.assertRefused(transport, "bad-name")
        _, transport = self.send(line[:-1] + b"x\n")
        self.assertRefused(transport, "header-too-long")

    def test_endlessHeaderBounded(self) -> None:
        """A header that never ends is cut at 4096 bytes; what follows is dropped, not kept."""
        protocol, transport = self.connect()
        for _ in range(1000):
            protocol.dataReceived(b"A" * 1000)
            self.assertLessEqual(protocol.buffered, MAX_HEADER)
        self.assertRefused(transport, "header-too-long")
        self.assertEqual(len(self.replies(transport)), 1)

    def test_malformedFields(self) -> None:
        """Headers with a missing, non-numeric, unknown or malformed field are refused as bad-header and store
        nothing."""
        for line in [b"PUT x 5", b"PUT 5", b"PUT  5 x", b"PUT colour=red 5 x", b"PUT sha256=12 5 x",
                     b"PUT 5x x", b"PUT 1.5 x"]:
            with self.subTest(line=line):
                _, transport = self.send(line + b"\n12345")
                self.assertRefused(transport, "bad-header")
        self.assertNothingStored()

    def test_negativeAndHugeSizes(self) -> None:
        """A negative size is bad-header, a size too big for a number is too-large, and one larger than the free
        space is no-space, with nothing stored."""
        for line, code in [(b"PUT -1 x", "bad-header"), (b"PUT 99999999999999999999 x", "too-large"),
                           (b"PUT 9223372036854775807 x", "no-space")]:
            with self.subTest(line=line):
                _, transport = self.send(line + b"\n")
                self.assertRefused(transport, code)
        self.assertNothingStored()

    def test_traversalAndControlNames(self) -> None:
        """Names that climb out, are absolute, empty, dots, or hold controls, tabs, backslashes or bidi marks are
        refused as bad-name with a printable message, and nothing is written anywhere."""
        for name in [b"../escape", b"../../etc/passwd", b"/etc/passwd", b"a/../../b", b"..", b".", b"",
                     b"evil\x1b[2J", b"nul\x00byte", b"tab\tname", b"dir\\..\\x", b"rlo\xe2\x80\xaetxt.exe"]:
            with self.subTest(name=name):
                _, transport = self.send(b"PUT 3 " + name + b"\nabc")
                error = self.assertRefused(transport, "bad-name")
                self.assertTrue(error.message.isprintable())
        self.assertNothingStored()
        self.assertEqual(os.listdir(os.path.dirname(os.path.abspath(self.dir))), [os.path.basename(self.dir)])

    def test_prefixCannotLeadOutOfTheFolder(self) -> None:
        """Even a prefix with a '/' in it (the tap refuses one at startup) keeps every file in --dir."""
        for prefix in ("../escaped_", "sub/"):
            with self.subTest(prefix=prefix):
                self.factory = self.makeFactory(prefix=prefix)
                _, transport = self.send(put("a.txt", b"abc"))
                self.assertIn("'/'", self.assertRefused(transport, "bad-name").message)
        self.assertNothingStored()
        self.assertEqual(os.listdir(os.path.dirname(os.path.abspath(self.dir))), [os.path.basename(self.dir)])

    def test_fileWhereAFolderIsNeeded(self) -> None:
        """A folder of the path is a file or symlink on the server: bad-name (the client exits 7),
        not exists (which means the name is taken: exit 8 with --no-rename)."""
        self.send(put("top", b"file"))
        os.symlink("/tmp", os.path.join(self.dir, "received_link"))
        for name in ("top/a.txt", "link/a.txt"):
            for clash in (None, Clash.FAIL):
                with self.subTest(name=name, clash=clash):
                    protocol, transport = self.send(formatPut(3, name, clash=clash))
                    if clash is None:
                        protocol.dataReceived(b"abc")  # found when the file is placed, after the body
                    error = self.assertRefused(transport, "bad-name")
                    self.assertIn("is a file or symlink on the server, not a folder", error.message)
        self.assertEqual(self.visible(), {"received_top": b"file"})
        self.assertEqual(self.hidden(), [])

    def test_checksumMismatchUpFront(self) -> None:
        """A body that does not match the checksum given in the header is refused as checksum-mismatch and not
        stored."""
        _, transport = self.send(formatPut(5, "a", sha256=sha(b"hellO")) + b"hello")
        self.assertRefused(transport, "checksum-mismatch")
        self.assertNothingStored()

    def test_checksumMismatchInTrailer(self) -> None:
        """A body that does not match the checksum in its trailer is refused as checksum-mismatch and not stored."""
        _, transport = self.send(formatPut(5, "a", trailer=True) + b"hello" + formatTrailer(sha(b"other")))
        self.assertRefused(transport, "checksum-mismatch")
        self.assertNothingStored()

    def test_badTrailer(self) -> None:
        """A trailer that is not a SHA256 line is refused as bad-header and nothing is stored."""
        _, transport = self.send(formatPut(5, "a", trailer=True) + b"helloMD5 1234\n")
        self.assertRefused(transport, "bad-header")
        self.assertNothingStored()

    def test_earlyEndOfInput(self) -> None:
        """The peer stops sending mid-body: short-body, and no half file anywhere."""
        protocol, transport = self.send(b"PUT 100 a\n" + b"x" * 40)
        protocol.readConnectionLost()
        error = self.assertRefused(transport, "short-body")
        self.assertIn("40 of 100", error.message)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertNothingStored()

    def test_earlyEndOfInputResumableKept(self) -> None:
        """A file whose sender half-closes mid-body is not made visible but its partial is kept for --resume."""
        protocol, _ = self.send(formatPut(100, "a", trailer=True) + b"x" * 40)
        protocol.readConnectionLost()
        protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.visible(), {})
        self.assertEqual(len(self.hidden()), 1, "kept for --resume")

    def test_endOfInputBeforeTrailer(self) -> None:
        """A sender that half-closes before its trailer is complete is refused as short-body and nothing becomes
        visible."""
        protocol, transport = self.send(formatPut(3, "a", trailer=True) + b"abcSHA")
        protocol.readConnectionLost()
        self.assertRefused(transport, "short-body")
        self.assertEqual(self.visible(), {})

    def test_endOfInputMidHeader(self) -> None:
        """A sender that half-closes in the middle of a header line is refused as bad-header."""
        protocol, transport = self.send(b"PUT 3 a")
        protocol.readConnectionLost()
        self.assertRefused(transport, "bad-header")

    def test_killedMidBody(self) -> None:
        """A connection lost mid-body stores nothing and is no longer counted."""
        protocol, transport = self.send(b"PUT 100 a\n" + b"x" * 40)
        protocol.connectionLost(Failure(Exception("reset")))
        self.assertNothingStored()
        self.assertEqual(self.factory.connections, 0)

    def test_bytesAfterBody(self) -> None:
        """The body is exactly <size> bytes; what follows must be a request."""
        _, transport = self.send(b"PUT 3 a\nabcdef\n")
        replies = self.replies(transport)
        self.assertEqual(replies[0], Ok(3, sha(b"abc"), "received_a"))
        self.assertRefused(transport, "bad-header")
        self.assertEqual(self.visible(), {"received_a": b"abc"})

    def test_httpRequest(self) -> None:
        """An HTTP request gets one bad-header reply that mentions PUT, and the connection is cut if the client does
        not go within the linger time."""
        protocol, transport = self.send(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
        error = self.assertRefused(transport, "bad-header")
        self.assertIn("PUT", error.message)
        self.assertEqual(len(self.replies(transport)), 1)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnected, "cut off if it does not go away by itself")

    def test_tlsClientHello(self) -> None:
        """A TLS ClientHello sent to the plain server is refused as bad-header."""
        _, transport = self.send(bytes.fromhex("160301020001000200") + os.urandom(500) + b"\n")
        self.assertRefused(transport, "bad-header")

    def test_headerTrickled(self) -> None:
        """A header sent a byte a second runs out of --header-timeout, however steady."""
        self.factory = self.makeFactory(headerTimeout=5)
        protocol, transport = self.connect()
        for byte in b"PUT 5 slow":
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.assertRefused(transport, "timeout")
        self.assertNothingStored()

    def test_idleConnection(self) -> None:
        """A connection that sends no header within the header timeout is refused as timeout, and not before."""
        self.factory = self.makeFactory(headerTimeout=5)
        _, transport = self.connect()
        self.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        self.assertRefused(transport, "timeout")

    def test_stalledBody(self) -> None:
        """A body that keeps trickling in is waited for, but one that stalls for the idle timeout is refused as
        timeout and not stored."""
        self.factory = self.makeFactory(idleTimeout=10)
        protocol, transport = self.send(formatPut(100, "a", trailer=True) + b"x" * 10)
        for _ in range(5):
            self.clock.advance(9)
            protocol.dataReceived(b"x")
        self.assertEqual(transport.value(), b"", "slow but moving is fine")
        self.clock.advance(10)
        self.assertRefused(transport, "timeout")
        self.assertEqual(self.visible(), {})

    def test_manyTinyFilesHitTheCap(self) -> None:
        """Thousands of tiny files on one connection: each temp is closed before the next, and the
        connection ends at the cap with a clear reply."""
        self.store.fsync = lambda fd: None  # the disk is not what this test is about
        fds = len(os.listdir("/proc/self/fd"))
        data = b"".join(put(f"f{i}", b"%d" % i) for i in range(1001))
        protocol, transport = self.send(data, 4096)
        replies = self.replies(transport)
        self.assertEqual(len(replies), 1001)
        self.assertTrue(all(isinstance(r, Ok) for r in replies[:1000]))
        self.assertRefused(transport, "too-many-files")
        self.assertEqual(len(self.visible()), 1000)
        self.assertEqual(self.hidden(), [])
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), fds)

    def test_capCounts(self) -> None:
        """Past --max-files per connection (a STAT counting as one) further requests are refused as too-many-files
        and the earlier file stays stored."""
        self.factory = self.makeFactory(maxFiles=2)
        _, transport = self.send(put("a", b"1") + formatStat(1, "b") + put("c", b"3"))
        self.assertRefused(transport, "too-many-files")
        self.assertEqual(self.visible(), {"received_a": b"1"})

    def test_maxSizeBeforeBody(self) -> None:
        """Too large is refused on the header alone: no body byte is needed, no file is created."""
        self.factory = self.makeFactory(maxSize=10)
        _, transport = self.send(b"PUT 11 big\n")
        error = self.assertRefused(transport, "too-large")
        self.assertIn("at most 10", error.message)
        self.assertEqual(self.files(), {})
        _, transport = self.send(put("ok", b"x" * 10))
        self.assertIsInstance(self.replies(transport)[0], Ok)

    def test_noSpaceBeforeBody(self) -> None:
        """A file larger than the free disk space is refused as no-space before any of its body is written."""
        self.store.freeBytes = lambda: 1000  # type: ignore[method-assign]
        _, transport = self.send(b"PUT 5000 big\n")
        self.assertRefused(transport, "no-space")
        self.assertEqual(self.files(), {})

    def test_writeErrorThenKeepsServing(self) -> None:
        """A disk error mid-body: io-error, the temp goes, and the next client is served."""
        write = self.store.write

        def failing(fd: int, data: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

        self.store.write = failing
        _, transport = self.send(put("a", b"hello", trailer=True))
        self.assertRefused(transport, "io-error")
        self.assertNothingStored()
        self.store.write = write
        _, transport = self.send(put("b", b"fine"))
        self.assertIsInstance(self.replies(transport)[0], Ok)

    def test_fsyncError(self) -> None:
        """A disk error while syncing the file is refused as io-error and leaves nothing stored."""
        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        self.store.fsync = failing
        _, transport = self.send(put("a", b"hello"))
        self.assertRefused(transport, "io-error")
        self.assertNothingStored()

    def test_inputAfterErrorDropped(self) -> None:
        """Input after a refusal is discarded without buffering, replying again or storing anything."""
        protocol, transport = self.send(b"BREW coffee\n")
        for _ in range(100):
            protocol.dataReceived(b"PUT 1 x\nx" * 1000)
        self.assertEqual(protocol.buffered, 0)
        self.assertEqual(len(self.replies(transport)), 1)
        self.assertNothingStored()

    def test_otherTransfersUnaffected(self) -> None:
        """One connection after another misbehaves while a good upload is interleaved with them."""
        data = os.urandom(50_000)
        good, goodTransport = self.connect()
        stream = put("good.bin", data, trailer=True)
        pieces = [stream[i:i + 5000] for i in range(0, len(stream), 5000)]
        bad = [b"GET / HTTP/1.1\r\n", b"PUT 5 ../x\nabcde", b"A" * 5000, formatPut(9, "z", sha256=sha(b"x")) + b"y" * 9,
               b"PUT 100 half\n" + b"h" * 50]
        for i, piece in enumerate(pieces):
            if i < len(bad):
                protocol, _ = self.send(bad[i])
                protocol.connectionLost(Failure(Exception("gone")))
            good.dataReceived(piece)
        self.assertEqual(self.replies(goodTransport), [Ok(len(data), sha(data), "received_good.bin")])
        self.assertEqual(self.visible(), {"received_good.bin": data})
        self.assertEqual(self.hidden(), [])

    def test_errorWhileCommittingWithPeerGone(self) -> None:
        """A connection lost while its file is still being committed is no longer counted."""
        calls: list[Any] = []
        self.store.runBlocking = lambda f, *args: calls.append((f, args)) or Deferred()  # type: ignore[assignment]
        protocol, _ = self.send(put("a", b"1"))
        protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.factory.connections, 0)


class Later:
    """A ``runBlocking`` whose calls wait until the test runs them (the store's thread, held)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    def runNext(self) -> None:
        d, f, args = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def countPauses(transport: StringTransport) -> list[str]:
    """Record each pauseProducing/resumeProducing the receiver asks of ``transport``."""
    calls: list[str] = []

    def recorded(name: str) -> Any:
        method = getattr(transport, name)

        def call() -> None:
            calls.append(name)
            method()
        return call

    for name in ("pauseProducing", "resumeProducing"):
        setattr(transport, name, recorded(name))
    return calls


class MachineTests(ServerTestCase):
    """The receiver as a LineReceiver with named states: framing, pausing and LOST."""

    def test_limitsAreLineReceiverLimits(self) -> None:
        """The request and trailer limits (newline included) are LineReceiver's MAX_LENGTH plus its delimiter."""
        protocol, _ = self.connect()
        self.assertIsInstance(protocol, LineReceiver)
        self.assertEqual(protocol.MAX_LENGTH + len(protocol.delimiter), MAX_HEADER)
        protocol.dataReceived(formatPut(3, "a", trailer=True) + b"abc")
        self.assertEqual(protocol.state, State.TRAILER)
        self.assertEqual(protocol.MAX_LENGTH + len(protocol.delimiter), MAX_TRAILER)

    def test_bodyWrittenWithoutCopies(self) -> None:
        """Each body byte reaches the disk straight from the read it came in (no copy, no joining of reads)."""
        seen: list[object] = []
        write = self.store.write

        def recording(fd: int, view: memoryview) -> int:
            seen.append(view.obj)
            return write(fd, view)

        self.store.write = recording
        protocol, transport = self.connect()
        reads = [os.urandom(1000), os.urandom(3000), os.urandom(500) + put("next", b"n")]
        data = b"".join(reads)[:4500]
        protocol.dataReceived(formatPut(4500, "big", sha256=sha(data)))
        for read in reads:
            protocol.dataReceived(read)
        self.assertEqual([r.name for r in self.replies(transport)], ["received_big", "received_next"])
        self.assertEqual(self.visible()["received_big"], data)
        self.assertEqual([id(obj) for obj in seen[:3]], [id(read) for read in reads])

    def test_quickStoreAnswersDoNotPauseReads(self) -> None:
        """Reading from the peer pauses only while the store works off the reactor thread (the commit),
        not for a new file, which opens at once."""
        self.store.fsync = lambda fd: None
        protocol, transport = self.connect()
        calls = countPauses(transport)
        protocol.dataReceived(put("a", b"1") + put("b", b"2") + formatStat(1, "c"))
        self.assertEqual(len(self.replies(transport)), 3)
        self.assertEqual(calls, [], "the store answered each at once")

        later = Later()
        self.store.runBlocking = later
        protocol.dataReceived(put("d", b"4") + put("e", b"5"))
        self.assertEqual((protocol.state, calls), (State.COMMITTING, ["pauseProducing"]))
        later.runNext()
        self.assertEqual((protocol.state, calls), (State.COMMITTING, ["pauseProducing", "resumeProducing",
                                                                      "pauseProducing"]))
        later.runNext()
        self.assertEqual(protocol.state, State.HEADER)
        self.assertEqual(calls[-1], "resumeProducing")
        self.assertEqual([r.name for r in self.replies(transport)[3:]], ["received_d", "received_e"])

    def test_lostWhilePreparing(self) -> None:
        """The peer leaves while its resumed file is being opened: the receiver is LOST, writes nothing,
        and the late answer only puts the partial file back for the next --resume."""
        data = os.urandom(5000)
        protocol, _ = self.send(formatPut(len(data), "big", trailer=True) + data[:3000])
        protocol.connectionLost(Failure(Exception("gone")))
        later = Later()
        self.store.runBlocking = later
        protocol, transport = self.send(put("big", data, trailer=True, offset=3000)[:100])
        self.assertEqual(protocol.state, State.PREPARING)
        protocol.connectionLost(Failure(Exception("gone again")))
        self.assertEqual(protocol.state, State.LOST)
        later.runNext()
        self.assertEqual((protocol.state, transport.value(), self.clock.getDelayedCalls()), (State.LOST, b"", []))
        self.assertEqual(self.factory.connections, 0)
        self.store.runBlocking = synchronous
        protocol, transport = self.send(formatStat(len(data), "big"))
        self.assertEqual(self.replies(transport), [Have(3000, sha(data[:3000]))])

    def test_lostWhileCommitting(self) -> None:
        """The peer leaves while its file is being committed: the file is still stored and counted, nothing is
        written to the gone connection; a commit that fails then is only logged."""
        later = Later()
        self.store.runBlocking = later
        protocol, transport = self.send(put("a", b"1"))
        protocol.connectionLost(Failure(Exception("gone")))
        later.runNext()
        self.assertEqual((protocol.state, transport.value()), (State.LOST, b""))
        self.assertEqual((self.visible(), self.factory.stored), ({"received_a": b"1"}, 1))

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        self.store.fsync = failing
        protocol, transport = self.send(put("b", b"2"))
        protocol.connectionLost(Failure(Exception("gone")))
        later.runNext()
        self.assertEqual((protocol.state, transport.value()), (State.LOST, b""))
        self.assertEqual((self.visible(), self.hidden(), self.factory.refused), ({"received_a": b"1"}, [], 0))
